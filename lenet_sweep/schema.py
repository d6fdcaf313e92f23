"""The composed config's contract, checked at start-up before anything is trained or recorded.

Hydra itself rejects unknown keys and missing group options; this checks the values' types and
ranges, each failure a one-line UserError naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import DictConfig

from lenet_sweep.errors import UserError

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Knob:
    kind: type
    allowed: str
    minimum: float | None = None
    positive: bool = False


KNOBS = {
    "lr": Knob(float, "a number > 0, e.g. lr=0.1", positive=True),
    "epochs": Knob(int, "an integer >= 1, e.g. epochs=10", minimum=1),
    "batch_size": Knob(int, "an integer from 1 to the training set size, e.g. 256", minimum=1),
    "seed": Knob(int, "an integer, e.g. seed=0"),
    "progress": Knob(bool, "true or false"),
    "divergence_threshold": Knob(float, "null or a number > 0, e.g. 23.0", positive=True),
    "data.train_size": Knob(int, "null or an integer >= 1", minimum=1),
    "data.test_size": Knob(int, "null or an integer >= 1", minimum=1),
}
NULLABLE = {"data.train_size", "data.test_size", "divergence_threshold"}


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check(key: str, value, knob: Knob) -> None:
    if value is None and key in NULLABLE:
        return
    bad = UserError(f"{key}={value}: must be {knob.allowed}")
    if knob.kind is bool:
        if not isinstance(value, bool):
            raise bad
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad
    if knob.kind is int and not isinstance(value, int):
        raise bad
    if knob.positive and not value > 0:
        raise bad
    if knob.minimum is not None and value < knob.minimum:
        raise bad
    if knob.kind is float and value != value:  # NaN
        raise bad


def validate(cfg: DictConfig) -> None:
    for key, knob in KNOBS.items():
        _check(key, _get(cfg, key), knob)
    train_n = cfg.data.train_size or cfg.data.num_train
    if cfg.batch_size > train_n:
        raise UserError(
            f"batch_size={cfg.batch_size}: must be {KNOBS['batch_size'].allowed} ({train_n} here)"
        )
    if not DEVICE.match(str(cfg.device)):
        raise UserError(f"device={cfg.device}: unknown device; allowed: auto, cpu, cuda, cuda:N")
