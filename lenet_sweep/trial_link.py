"""A sweep job's link to its Optuna trial, reached through the study's storage (the job's side
of lenet_sweep.protocol), so that pruning works in any launcher process.
"""

from __future__ import annotations

import os

import optuna

from lenet_sweep import protocol
from lenet_sweep.study_storage import open_storage, running_trial


class TrialLink:
    def __init__(self, storage_url: str, study_name: str, number: int, pruner=None):
        storage = open_storage(storage_url)
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        self.trial = running_trial(self.study, storage, number)
        self.number = number
        # Optuna keeps intermediate values (and prunes) for single-objective studies only.
        self.reports = len(self.study.directions) == 1

    @classmethod
    def from_config(cls, trial_cfg, pruner_cfg=None) -> TrialLink | None:
        """The link for a job the sweeper launched (None for a single run).

        `pruner_cfg` is the job's own composed `hydra.sweeper.pruner`, the node the sweeper built
        its pruner from: pruning is decided here, and Optuna does not store pruners.
        """
        if trial_cfg is None or trial_cfg.number is None:
            return None
        storage = os.environ.get(protocol.STORAGE_ENV)
        if not storage:
            raise RuntimeError(f"{protocol.TRIAL_NUMBER} is set but ${protocol.STORAGE_ENV} is not")
        from hydra.utils import instantiate

        pruner = instantiate(pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner()
        return cls(str(storage), str(trial_cfg.study_name), int(trial_cfg.number), pruner)

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
