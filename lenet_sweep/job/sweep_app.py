"""lenet_sweep's additions to the generic sweep (hydra.sweeper.app in conf/config.yaml): the
checks of its knobs, the study's MLflow parent run, each trial's child-run bookkeeping (its
`trial.*` overrides), the end of dead trials' runs, the best trial on the parent run."""

from __future__ import annotations

import logging

from lenet_sweep import config
from lenet_sweep.config.identity import setting
from lenet_sweep.errors import UserError, mask_url
from lenet_sweep.job.parent_run import SweepRun, kill_trial_runs
from lenet_sweep.process import ROLE
from lenet_sweep.sweep import protocol
from lenet_sweep.sweep.app import SweepApp
from lenet_sweep.sweep.report import SweepFailed
from lenet_sweep.sweep.search_space import format_value
from lenet_sweep.tracking import backend

log = logging.getLogger("lenet_sweep.sweep")
REFIT_SEED = 1000  # the refit's seeds start at seed + 1000: fresh, none a trial trained with


def trial_name(number: int, params: dict) -> str:
    """`t003 lr=0.0826 ep=12`: short enough to read in the MLflow UI's runs table."""
    return " ".join([f"t{number:03d}", *(setting(k, v) for k, v in params.items())])


# What a run returns (its last epoch's metrics and its totals): what objectives may name.
METRICS = {"val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "train_acc"}
METRICS |= {"train_time_s", "examples_per_sec"}


def _directions(settings) -> list:
    direction = settings.direction
    return [direction] if isinstance(direction, str) else list(direction)


class LenetSweepApp(SweepApp):
    def __init__(self, config_, settings) -> None:
        super().__init__(config_, settings)
        self.tracking_uri = backend.resolve_tracking_uri(config_.mlflow.tracking_uri)

    def check(self, space: dict, group_options) -> None:
        config.check_sweep(self.config, space, group_options)
        self._check_memory()
        if self.config.resume:
            raise UserError(
                f"resume={self.config.resume}: a sweep's trials start afresh; a stopped sweep goes "
                "on when the same command runs again (drop resume)"
            )
        for name in list(self.settings.objectives or [])[: len(_directions(self.settings))]:
            if name.removesuffix("_std") not in METRICS:
                raise UserError(
                    f"hydra.sweeper.objectives: {name} is not a metric a run returns; choose "
                    f"from {', '.join(sorted(METRICS))} (or one's _std, with seeds > 1)"
                )
        named = list(self.settings.objectives or [])[: len(_directions(self.settings))]
        if tested := [name for name in named if name.startswith("test_")]:
            log.warning(
                "hydra.sweeper.objectives=%s: the sweep picks its best on the test set, so the "
                "best's test score is biased upward; tune on val_acc (the validation split)",
                ",".join(tested),
            )

    def _check_memory(self) -> None:
        """One group's members (a trial's seeds; with hydra/launcher=fused, its slots) fit."""
        from lenet_sweep.core import memory
        from lenet_sweep.job.job import build_model

        cfg, fused = self.config, self.config.hydra.runtime.choices.get("hydra/launcher")
        members, what = cfg.seeds, f"seeds={cfg.seeds}"
        if fused == "fused":
            slots = min(self.settings.n_jobs, cfg.hydra.launcher.max_group or self.settings.n_jobs)
            members, what = max(slots, cfg.seeds), f"hydra.sweeper.n_jobs={slots} with {what}"
        memory.check_config(cfg, build_model, config.resolve_device(cfg.device), members, what)

    def prepare(self) -> None:
        """The store and the experiment, before any study: a deleted experiment or a store away
        is told before anything of the sweep exists."""
        self.experiment_id = backend.prepare_experiment(
            self.tracking_uri, self.config.mlflow.experiment
        )

    def open_record(self, study, params: dict) -> SweepRun:
        experiment_id = self.experiment_id
        record = SweepRun.open(self.tracking_uri, experiment_id, study, params, ROLE.is_driver)
        level = logging.INFO if ROLE.is_driver else logging.DEBUG  # the driver's line
        log.log(level, "MLflow: %s", backend.ui_link(self.tracking_uri, experiment_id))
        return record

    def trial_overrides(self, trial, record) -> list[str]:
        name = trial_name(trial.number, trial.params)
        return protocol.trial_overrides(trial.number, name, trial.study.study_name, record.run_id)

    refit_metric = "test_acc"

    def refit_overrides(self, best, seeds: int, record) -> list[str]:
        """All the training images (nothing held out), `seeds` fresh seeds side by side
        (REFIT_SEED + seed on: none a trial trained with), a child run of the parent told
        apart (role refit), in the sweep dir's `refit/`."""
        fresh = REFIT_SEED + int(self.config.seed)
        name = f"refit {trial_name(best.number, best.params)}"
        study = format_value(str(self.settings.study_name))
        return [
            "data.val_size=0",
            f"seeds={seeds}",
            f"seed={fresh}",
            "trial.role=refit",
            f"trial.name={format_value(name)}",
            f"trial.study_name={study}",
            f"trial.parent_run_id={record.run_id}",
            "hydra.sweep.subdir=refit",
        ]

    def trials_lost(self, trials) -> None:
        kill_trial_runs(self.tracking_uri, trials)

    def finish(self, record, study, best: list, results: dict, objectives: list[str]) -> None:
        record.record_best(study, best, results, objectives, self.settings.register_model)

    def failure(self, error: Exception):
        from mlflow.exceptions import MlflowException

        if not isinstance(error, MlflowException):
            return None
        first = mask_url(str(error)).splitlines()[0][:300]
        return SweepFailed(
            f"MLflow at {mask_url(str(self.tracking_uri))} failed: {first}; start the tracking "
            "server (or fix MLFLOW_TRACKING_URI) and rerun the same command: the study goes on"
        )
