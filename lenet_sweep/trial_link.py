"""A sweep job's link to its Optuna trial, reached through the study's storage.

The sweeper passes `trial.number` and `trial.study_name` as overrides and the storage URL in
$LENET_SWEEP_OPTUNA_STORAGE (never in logged overrides: it may hold a password), so the
job can report per-epoch test accuracy and be pruned even when it runs in another process.
"""

from __future__ import annotations

import os

import optuna

STORAGE_ENV = "LENET_SWEEP_OPTUNA_STORAGE"  # set by the sweeper for its jobs


class TrialLink:
    def __init__(self, storage: str, study_name: str, number: int, pruner=None):
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        storage_obj = self.study._storage  # the public BaseStorage API is used from here on
        self.trial_id = storage_obj.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number
        )
        self.trial = optuna.trial.Trial(self.study, self.trial_id)
        self.number = number

    @classmethod
    def from_config(cls, trial_cfg) -> TrialLink | None:
        if trial_cfg is None or trial_cfg.number is None:
            return None
        storage = trial_cfg.storage or os.environ.get(STORAGE_ENV)
        if not storage:
            raise RuntimeError(
                f"trial.number is set but no storage: set trial.storage or ${STORAGE_ENV}"
            )
        return cls(str(storage), str(trial_cfg.study_name), int(trial_cfg.number), _sweep_pruner())

    def set_attr(self, key: str, value) -> None:
        self.study._storage.set_trial_user_attr(self.trial_id, key, value)

    def report(self, value: float, epoch: int) -> bool:
        """Report one epoch's objective; True when the pruner says stop."""
        self.trial.report(value, step=epoch)
        return self.trial.should_prune()


def _sweep_pruner() -> optuna.pruners.BasePruner:
    """The sweeper's pruner, rebuilt from hydra.sweeper.pruner in the job's own config.

    Pruning is decided here, in the job, so the job needs the same pruner the study was made
    with; Optuna does not store pruners.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    if HydraConfig.initialized():
        pruner_cfg = HydraConfig.get().sweeper.get("pruner")
        if pruner_cfg:
            return instantiate(pruner_cfg)
    return optuna.pruners.NopPruner()
