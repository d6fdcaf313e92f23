"""The sweeper's settings (`hydra.sweeper.*`) as a structured config in Hydra's ConfigStore.

Hydra imports every module under hydra_plugins when it starts (outside sys.modules, hence no
`from __future__ import annotations` here), so the store() below runs before
any config is composed: `override hydra/sweeper: lenet_optuna` finds it in any Hydra app.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from lenet_sweep.config import knob


@dataclass
class LenetOptunaSweeperConf:
    """The official hydra-optuna-sweeper's keys, plus pruner and heartbeat."""

    _target_: str = "hydra_plugins.lenet_sweep_optuna.sweeper.LenetOptunaSweeper"
    defaults: list[Any] = field(
        default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "none"}]
    )
    sampler: Any = None  # hydra/sweeper/sampler/*: built by Hydra (grid: a partial)
    direction: Any = "maximize"  # or a list: one direction per objective (multi-objective)
    objectives: list[str] | None = None  # metrics of the job, one per direction; null:
    # test_acc (one direction), test_acc and train_time_s (two)
    storage: str | None = None  # Optuna RDB URL; same storage + study_name = same study
    study_name: str | None = None
    n_trials: int = knob(20, "an integer >= 1", minimum=1)  # the study's total
    n_jobs: int = knob(1, "an integer >= 1", minimum=1)  # trials handed to the launcher at once
    max_failure_rate: float = knob(0.5, "a number in [0, 1]", minimum=0, maximum=1)
    params: dict[str, str] | None = None  # the search space in Hydra's sweep grammar
    custom_search_space: str | None = None  # "module.fn": fn(cfg, trial) suggests extra params
    enqueue: list[dict[str, Any]] | None = None  # parameter sets tried first, once per study
    pruner: Any = None  # hydra/sweeper/pruner/*
    heartbeat_interval: int = knob(10, "an integer >= 1 (seconds)", minimum=1)
    grace_period: int = knob(30, "an integer >= 1 (seconds)", minimum=1)


ConfigStore.instance().store(
    group="hydra/sweeper", name="lenet_optuna", node=LenetOptunaSweeperConf, provider="lenet_sweep"
)
