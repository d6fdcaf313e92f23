"""The run's schema: structured configs in Hydra's ConfigStore (lenet_sweep/conf/config.yaml extends it).

Hydra (through OmegaConf) enforces each knob's type while it composes; `checks.validate` adds
the ranges each knob declares here, next to its type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from lenet_sweep import PROJECT_ROOT
from lenet_sweep.config.knobs import knob


@dataclass
class DataConf:
    name: str = MISSING
    root: str | None = None
    system_root: str | None = None
    torchvision_class: str = MISSING
    train_size: int | None = knob(None, "null or an integer from 1 to the split's size", minimum=1)
    test_size: int | None = knob(None, "null or an integer from 1 to the split's size", minimum=1)
    num_train: int = 60000
    num_test: int = 10000
    num_classes: int = 10
    sha256: dict[str, str | None] | None = None


@dataclass
class MLflowConf:
    tracking_uri: str | None = None
    experiment: str = "lenet_sweep"
    run_name: str | None = None


@dataclass
class TrialConf:
    """Set by the sweeper for each trial (see lenet_sweep.sweep.protocol); null for a single run."""

    number: int | None = None
    name: str | None = None  # the MLflow run name, e.g. "t003 lr=0.0826 ep=12"
    study_name: str | None = None
    parent_run_id: str | None = None


@dataclass
class RunConfig:
    """The top-level knobs of one training run (defaults and comments: lenet_sweep/conf/config.yaml)."""

    model: Any = MISSING
    optimizer: Any = MISSING
    data: DataConf = field(default_factory=DataConf)
    lr: float = knob(0.9, "a finite number > 0, e.g. lr=0.1", positive=True)
    epochs: int = knob(10, "an integer >= 1, e.g. epochs=10", minimum=1)
    batch_size: int = knob(256, "an integer from 1 to the training set size, e.g. 256", minimum=1)
    seed: int = knob(42, "an integer, e.g. seed=0")
    device: str = "auto"
    cuda_graph: bool = knob(True, "true or false")
    precision: str = knob("fp32", "fp32 or bf16", choices=("fp32", "bf16"))
    progress: bool = knob(True, "true or false")
    divergence_threshold: float | None = knob(
        23.0, "null or a finite number > 0, e.g. 23.0", positive=True
    )
    resume: str | None = None
    mlflow: MLflowConf = field(default_factory=MLflowConf)
    trial: TrialConf = field(default_factory=TrialConf)


def register() -> None:
    """Store the schema (lenet_sweep/conf/config.yaml extends it) and the `project_root` resolver.

    Called where the Hydra app is defined (lenet_sweep.cli), as Hydra's docs do, and by
    anything that composes the config itself (the tests).
    """
    ConfigStore.instance().store(name="lenet_sweep_schema", node=RunConfig)
    # Hydra's run/sweep dirs use ${project_root:} so outputs land in <project>/outputs (the
    # checkout, or where an installed package starts), a run's dir ${pid:} so that runs
    # started in the same second never share one.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()))
