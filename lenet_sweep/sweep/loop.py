"""The sweep loop: ask a batch of trials, launch it through Hydra's launcher, tell the results.

What the official hydra-optuna-sweeper lacks and this adds: n_trials is the study's total (a
rerun finishes what is left), dead workers' trials are failed first, pruning reaches jobs in
other processes, NaN/inf/raising jobs fail only their trial, several workers share one study
without overshooting n_trials (lenet_sweep.sweep.storage), and the sweep is one MLflow parent
run with a child run per trial (lenet_sweep.sweep.parent_run). Jobs and sweeper meet through
lenet_sweep.sweep.protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

import optuna
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lenet_sweep import signals
from lenet_sweep.config.identity import setting
from lenet_sweep.config.plugins import LenetOptunaSweeperConf
from lenet_sweep.errors import Outage, first_line, mask_url, one_line, outage
from lenet_sweep.stores import store_file
from lenet_sweep.sweep import protocol, report, search_space
from lenet_sweep.sweep import storage as study_storage
from lenet_sweep.sweep.parent_run import NoSweepRun, SweepRun, kill_trial_runs
from lenet_sweep.sweep.report import SweepFailed
from lenet_sweep.sweep.setup import SweepSetup
from lenet_sweep.tracking import store as tracking_store

log = logging.getLogger("lenet_sweep.sweep")
# Hydra's launchers log each job's overrides, the protocol's internals among them (trial.*,
# env_set): the sweep logs each trial's number and params instead.
_LAUNCHER_LOGS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
    "hydra_plugins.hydra_ray_launcher._core",
    "hydra_plugins.hydra_joblib_launcher._core",
)


def _one_log_format() -> None:
    """Optuna's INFO lines off and its warnings through the app's handlers, in the app's format;
    the launchers' job lines off."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    for name in _LAUNCHER_LOGS:
        logging.getLogger(name).setLevel(logging.WARNING)


_ABSENT = object()


def record(study: optuna.Study, trial: optuna.Trial, outcome: protocol.Outcome) -> TrialState:
    """Store one job's outcome in its trial; returns the trial's state."""
    if outcome.state == TrialState.FAIL:
        trial.set_user_attr(protocol.FAIL_REASON, outcome.reason)
        log.warning("trial %d failed: %s", trial.number, outcome.reason)
    elif outcome.state == TrialState.PRUNED:
        log.info("trial %d pruned (%s)", trial.number, outcome.reason)
    study_storage.tell(study, trial, values=outcome.values, state=outcome.state)
    return outcome.state


def trial_name(number: int, params: dict) -> str:
    """`t003 lr=0.0826 ep=12`: short enough to read in the MLflow UI's runs table."""
    return " ".join([f"t{number:03d}", *(setting(k, v) for k, v in params.items())])


def _shown(params: dict) -> str:
    return " ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in params.items())


class OptunaSweep:
    """One sweep process: settings + Hydra's composed config + a launcher."""

    def __init__(
        self,
        settings: LenetOptunaSweeperConf,
        config: DictConfig,
        launcher,
        group_options: Callable[[str], list[str]],
    ):
        self.settings, self.config, self.launcher = settings, config, launcher
        _one_log_format()
        self.setup = SweepSetup(settings, config, group_options)
        self.directions, self.objectives = self.setup.directions, self.setup.objectives
        self.sweep_dir = self.setup.sweep_dir
        self.mlflow_uri = None
        self.groups: dict[str, tuple[int, int]] = {}  # fused: id -> (live epochs, slot epochs)
        if settings.mlflow:  # the app's `mlflow` node says where (lenet_sweep's config has one)
            self.mlflow_uri = tracking_store.resolve_tracking_uri(config.mlflow.tracking_uri)

    def run(self, arguments: list[str]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._run(arguments)
        except Outage:
            raise
        except Exception as e:
            where = store_file(e, self.mlflow_uri, self.settings.storage)
            if down := outage(e, where):  # a store this process talks to went away, or is full
                raise down from e
            if not isinstance(e, MlflowException):
                raise
            first = mask_url(str(e)).splitlines()[0][:300]
            raise SweepFailed(
                f"MLflow at {mask_url(str(self.mlflow_uri))} failed: {first}; start "
                "the tracking server (or fix MLFLOW_TRACKING_URI) and rerun the "
                "same command: the study goes on"
            ) from e

    def _run(self, arguments: list[str]) -> None:
        settings = self.settings
        space, fixed = self.setup.check(arguments)
        sampler = self.setup.sampler(space)
        if self.mlflow_uri:
            experiment_id = tracking_store.prepare_experiment(
                self.mlflow_uri, self.config.mlflow.experiment
            )
        storage = study_storage.open_storage(
            settings.storage, settings.heartbeat_interval, settings.grace_period
        )
        study = self.setup.open_study(storage, sampler)
        dead = study_storage.fail_dead_workers(study, storage, settings.grace_period)
        if self.mlflow_uri:
            kill_trial_runs(self.mlflow_uri, dead)
        done, shown = study_storage.budget_used(study), search_space.describe(space)
        where, name = mask_url(settings.storage), type(sampler).__name__
        log.info("study %s in %s: %d/%d trials done, sampler %s, search %s",
                 study.study_name, where, done, settings.n_trials, name, shown)  # fmt: skip
        with study_storage.ask_lock(storage, settings.storage):
            parent = (
                NoSweepRun()
                if not self.mlflow_uri
                else SweepRun.open(
                    self.mlflow_uri,
                    experiment_id,
                    study,
                    {
                        "study_name": study.study_name,
                        "storage": settings.storage,
                        "sampler": type(sampler).__name__,
                        "pruner": type(self.setup.pruner()).__name__,
                        "direction": self.directions,
                        "objectives": self.objectives,
                        "n_trials": settings.n_trials,
                        "search_space": {k: repr(v) for k, v in space.items()},
                    },
                )
            )
            self.setup.enqueue(study)
        parent.set_tags({"sweep_dir": self.sweep_dir})
        if self.mlflow_uri:
            log.info("MLflow: %s", tracking_store.ui_link(self.mlflow_uri, experiment_id))
        started = time.perf_counter()
        with protocol.storage_env(settings.storage):
            states = self._loop(study, storage, space, fixed, parent)
        report.finish(self, study, parent, len(states), time.perf_counter() - started)

    # --- the loop ------------------------------------------------------------------------
    def _loop(self, study, storage, space, fixed, parent: SweepRun) -> list[TrialState]:
        """Ask, launch, tell until the budget is spent, failures pass the rate, or a signal."""
        heartbeat = study_storage.Heartbeat(
            storage, study.study_name, self.settings.heartbeat_interval
        )
        heartbeat.start()
        states: list[TrialState] = []
        in_flight: list[optuna.Trial] = []
        lost = 0  # trials whose job process died (killed, out of memory, node lost)
        try:
            with signals.stop_on_signals():
                while not signals.check() and (in_flight := self._ask(study, storage)):
                    heartbeat.watch(in_flight)
                    overrides = [self._overrides(t, space, fixed, parent.run_id) for t in in_flight]
                    for trial in in_flight:
                        log.info("trial %d started: %s", trial.number, _shown(trial.params))
                    try:
                        returns = self.launcher.launch(
                            overrides, initial_job_idx=in_flight[0].number
                        )
                    except Exception as e:  # noqa: BLE001 - a launcher reports a dead job so
                        if down := outage(e, self.sweep_dir):  # e.g. Hydra writing a job dir
                            raise down from e
                        lost += self._batch_lost(study, storage, in_flight, e)
                        heartbeat.watch([])
                        if lost / self.settings.n_trials > self.settings.max_failure_rate:
                            raise SweepFailed(
                                f"{lost} trials lost with their job processes, "
                                f"last: {type(e).__name__}: {mask_url(str(e))[:300]}; "
                                "see the launcher's job logs"
                            ) from e
                        continue
                    for ret in returns:  # fused groups: how busy their slots were
                        if group := getattr(ret, protocol.TRAINED_TOGETHER, None):
                            self.groups[group[0]] = group[1:]
                    outcomes = [protocol.job_outcome(r, self.objectives) for r in returns]
                    states += self._record(study, storage, in_flight, outcomes)
                    heartbeat.watch([])
                    if report.too_many_failures(study, self.settings):
                        break
        except BaseException as e:
            # Interrupted or an outage: fail this worker's in-flight trials (they run again).
            why = one_line(e) if isinstance(e, Outage) else "interrupted"
            for trial in in_flight:
                with contextlib.suppress(Exception):
                    study_storage.fail_for_rerun(study, storage, trial.number, why)
            with contextlib.suppress(Exception):
                parent.end("KILLED")
            raise
        finally:
            heartbeat.stopped.set()
        return states

    def _record(self, study, storage, trials, outcomes) -> list[TrialState]:
        """Tell the study each outcome; a trial an outage hit runs again, and stops the sweep."""
        down = [(t, o) for t, o in zip(trials, outcomes, strict=True) if o.rerun]
        for trial, outcome in down:
            study_storage.fail_for_rerun(study, storage, trial.number, outcome.reason)
        told = [(t, o) for t, o in zip(trials, outcomes, strict=True) if not o.rerun]
        states = [record(study, t, o) for t, o in told]
        report.log_progress(study, [t for t, _ in told], [o for _, o in told], self.objectives)
        if down:
            trial, outcome = down[0]
            raise Outage(f"trial {trial.number} stopped, to run again: {outcome.reason}")
        return states

    def _batch_lost(self, study, storage, in_flight: list[optuna.Trial], error: Exception) -> int:
        """A job process died (submitit and Ray raise for the whole batch): fail the batch's
        trials for a rerun, so that new trials replace them, and end their MLflow runs KILLED.
        Returns how many were lost."""
        why = f"job process died: {type(error).__name__}: {first_line(error, 300)}"
        log.warning("trials %s: %s; their trials run again", [t.number for t in in_flight], why)
        for trial in in_flight:
            study_storage.fail_for_rerun(study, storage, trial.number, why)
        if self.mlflow_uri:
            numbers = {t.number for t in in_flight}
            lost = [t for t in study.get_trials(deepcopy=False) if t.number in numbers]
            kill_trial_runs(self.mlflow_uri, lost)
        return len(in_flight)

    def _ask(self, study, storage) -> list[optuna.Trial]:
        with study_storage.ask_lock(storage, self.settings.storage):
            left = self.settings.n_trials - study_storage.budget_used(study)
            with study_storage.heartbeat_warnings_off():
                trials = [study.ask() for _ in range(max(0, min(self.settings.n_jobs, left)))]
            for trial in trials:
                trial.set_user_attr(protocol.WORKER_HOST, tracking_store.HOST)
                trial.set_user_attr(protocol.WORKER_PID, os.getpid())
        return trials

    def _overrides(self, trial, space, fixed, parent_run_id) -> list[str]:
        for name, dist in space.items():
            search_space.suggest(trial, name, dist)
        if self.settings.custom_search_space:
            get_method(self.settings.custom_search_space)(self.config, trial)
        overrides = [
            f"{self._key(k)}={search_space.format_value(v)}" for k, v in trial.params.items()
        ]
        overrides += [f"{k}={v}" for k, v in fixed.items() if k not in trial.params]
        overrides += protocol.job_env(trial.number, trial.study.study_name)
        if "trial" in self.config:  # an app with a trial node gets its MLflow bookkeeping too
            name = trial_name(trial.number, trial.params)
            overrides += protocol.trial_overrides(
                trial.number, name, trial.study.study_name, parent_run_id
            )
        return overrides

    def _key(self, key: str) -> str:
        """`+key` for a parameter the app's config lacks (one a custom search space added)."""
        missing = OmegaConf.select(self.config, key, default=_ABSENT) is _ABSENT
        return f"+{key}" if missing else key
