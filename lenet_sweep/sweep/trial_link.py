"""A sweep job's link to its Optuna trial, reached through the study's storage (the job's side
of lenet_sweep.sweep.protocol), so that pruning works in any launcher process. `report(value, step)`
is the same for any Hydra app the sweeper runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import optuna

from lenet_sweep.sweep import protocol
from lenet_sweep.sweep.study_db import open_storage, running_trial


@functools.cache
def _storage(url: str):
    """One storage (engine, connection pool) per process: a fused launch links many trials."""
    return open_storage(url)


class TrialLink:
    def __init__(self, storage_url: str, study_name: str, number: int, pruner=None):
        storage = _storage(storage_url)
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        self.trial = running_trial(self.study, storage, number)
        self.number = number
        # Optuna keeps intermediate values (and prunes) for single-objective studies only.
        self.reports = len(self.study.directions) == 1
        self.objective: str | None = None  # the metric reported each epoch, by name

    @classmethod
    def current(cls, sweeper_cfg=None) -> TrialLink | None:
        """The link for the job a sweep launched, from its environment (None outside a sweep).

        `sweeper_cfg` is the job's own composed `hydra.sweeper`, the node the sweeper was built
        from: the pruner is rebuilt from its `pruner` (Optuna does not store pruners), and its
        `storage` is used where STORAGE_ENV did not travel (a Ray cluster's workers run in the
        environment of `ray start`, not of the sweep).
        """
        number, study_name = os.environ.get(protocol.TRIAL_ENV), os.environ.get(protocol.STUDY_ENV)
        if number is None or study_name is None:
            return None
        sweeper_cfg = sweeper_cfg or {}
        storage = os.environ.get(protocol.STORAGE_ENV) or sweeper_cfg.get("storage")
        if not storage:
            raise RuntimeError(f"${protocol.TRIAL_ENV} is set but ${protocol.STORAGE_ENV} is not")
        from hydra.utils import instantiate

        pruner_cfg = sweeper_cfg.get("pruner")
        pruner = instantiate(pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner()
        link = cls(storage, study_name, int(number), pruner)
        link.objective = (list(sweeper_cfg.get("objectives") or []) or [None])[0]
        return link

    def run_tags(self, parent_run_id) -> dict[str, str]:
        """Tags that make the job's MLflow run a child of the sweep's parent run."""
        return {
            protocol.TAG_PARENT_RUN: str(parent_run_id),
            protocol.TAG_STUDY_NAME: self.study.study_name,
            protocol.TAG_TRIAL_NUMBER: str(self.number),
        }

    def started(self, mlflow_run_id: str) -> None:
        self.trial.set_user_attr(protocol.MLFLOW_RUN_ID, mlflow_run_id)

    def report(self, value: float, epoch: int) -> bool:
        """Report one epoch's objective; True when the pruner says stop."""
        if not self.reports:
            return False
        self.trial.report(value, step=epoch)
        return self.trial.should_prune()

    def completed(self, train_time_s: float) -> None:
        self.trial.set_user_attr(protocol.TRAIN_TIME_S, train_time_s)


def prune(link: TrialLink, on_pruned: Callable) -> Callable:
    """An epoch hook (lenet_sweep.core.hooks): report the epoch's objective, by its name, to the
    trial; when its pruner says stop, call `on_pruned(state)` (which ends the records) and raise
    TrialPruned."""

    def hook(state) -> None:
        value = state.stats.get(link.objective) if link.objective else None
        if value is not None and link.report(value, state.epoch):
            on_pruned(state)
            raise optuna.TrialPruned(f"pruned after epoch {state.epoch}")

    return hook


_links: dict[tuple[str, str], TrialLink] = {}


def report(value: float, step: int) -> None:
    """For any Hydra task a lenet_optuna sweep launched: report the trial's value at `step`;
    raises optuna.TrialPruned when the sweep's pruner says stop. Outside a sweep, nothing.

    The pruner is rebuilt from this job's `hydra.sweeper.pruner` (Hydra's config of the job).
    """
    key = (os.environ.get(protocol.TRIAL_ENV), os.environ.get(protocol.STUDY_ENV))
    if None in key:
        return
    if key not in _links:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        _links[key] = TrialLink.current(hydra.sweeper if hydra else None)
    if _links[key].report(value, step):
        raise optuna.TrialPruned(f"pruned at step {step}")
