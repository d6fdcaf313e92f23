"""The run's schema: structured configs in Hydra's ConfigStore (conf/config.yaml extends it).

Hydra (through OmegaConf) enforces each knob's type while it composes; `checks.validate` adds
the ranges each knob declares here, next to its type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from lenet_sweep.config.knobs import knob


@dataclass
class DataConf:
    name: str = MISSING
    root: str | None = knob(
        None, "null or a folder", "the four idx files (.gz or plain); null: Debian's, else download"
    )
    system_root: str | None = None
    torchvision_class: str = MISSING
    train_size: int | None = knob(
        None,
        "null or an integer from 1 to the split's size",
        "the first N training examples",
        minimum=1,
    )
    test_size: int | None = knob(
        None,
        "null or an integer from 1 to the split's size",
        "the first N test examples",
        minimum=1,
    )
    val_size: int | None = knob(
        None,
        "null or an integer >= 0",
        "training images held out to validate (a fixed draw); null: a twelfth of those used "
        "in a sweep (5000 of 60000), none in a single run",
        minimum=0,
    )
    num_train: int = 60000
    num_test: int = 10000
    num_classes: int = 10
    sha256: dict[str, str | None] | None = None


@dataclass
class MLflowConf:
    tracking_uri: str | None = knob(
        None,
        "null or an MLflow tracking URI",
        "null: $MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db",
    )
    experiment: str = knob("lenet_sweep", "a name", "the MLflow experiment")
    run_name: str | None = knob(None, "null or a name", "null: the config and what differs")


@dataclass
class TrialConf:
    """Set by the sweeper for each trial (see lenet_sweep.sweep.protocol); null for a single run."""

    number: int | None = None
    name: str | None = None  # the MLflow run name, e.g. "t003 lr=0.0826 ep=12"
    study_name: str | None = None
    parent_run_id: str | None = None
    role: str | None = None  # "refit": the study's best trained again (lenet_sweep.sweep.refit)


@dataclass
class RunConfig:
    """The top-level knobs of one training run (defaults and comments: conf/config.yaml)."""

    model: Any = MISSING
    optimizer: Any = MISSING
    data: DataConf = field(default_factory=DataConf)
    lr: float = knob(0.9, "a finite number > 0, e.g. lr=0.1", "the learning rate", positive=True)
    epochs: int = knob(10, "an integer >= 1, e.g. epochs=10", "passes over the data", minimum=1)
    batch_size: int = knob(
        256,
        "an integer from 1 to the training set size, e.g. 256",
        "examples per step",
        minimum=1,
    )
    seed: int = knob(42, "an integer, e.g. seed=0", "init and shuffle")
    seeds: int = knob(
        1,
        "an integer >= 1, e.g. seeds=5",
        "seeds seed..seed+N-1 trained side by side; metrics: their mean, _std beside",
        minimum=1,
    )
    device: str = knob("auto", "auto, cpu, cuda or cuda:N", "auto: cuda when available, else cpu")
    cuda_graph: bool = knob(True, "true or false", "on CUDA, steps replayed as CUDA graphs")
    precision: str = knob(
        "fp32", "fp32 or bf16", "bf16: under autocast, weights stay fp32", choices=("fp32", "bf16")
    )
    progress: bool = knob(True, "true or false", "a bar over each epoch, on a terminal")
    divergence_threshold: float | None = knob(
        23.0,
        "null or a finite number > 0, e.g. 23.0",
        "stop when an epoch's train loss is above it; null: NaN/inf only",
        positive=True,
    )
    resume: str | None = knob(
        None, "null, a run dir, a checkpoint.pt or last", "continue a stopped run"
    )
    mlflow: MLflowConf = field(default_factory=MLflowConf)
    trial: TrialConf = field(default_factory=TrialConf)
