"""The configs' schema: structured configs in Hydra's ConfigStore, and their start-up checks.

Hydra (through OmegaConf) enforces each knob's type while it composes; `validate` adds the
ranges. Both end in the same one-line message naming the key, the value and what is allowed,
which each knob declares once, here, next to its type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING as NO_FACTORY
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError

from lenet_sweep import PROJECT_ROOT
from lenet_sweep.errors import UserError


@dataclass(frozen=True)
class Knob:
    """What a user may set: `allowed` completes the message `key=value: must be <allowed>`."""

    allowed: str
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    choices: tuple = ()
    kind: type | None = None  # from the field's annotation, filled in by knobs()

    def check(self, key: str, value) -> None:
        bad = (
            (self.positive and not value > 0)
            or (self.minimum is not None and value < self.minimum)
            or (self.maximum is not None and value > self.maximum)
            or (isinstance(value, float) and not math.isfinite(value))
            or (self.choices and value not in self.choices)
        )
        if bad:
            raise self.error(key, value)

    def error(self, key: str, value) -> UserError:
        # Shown as typed: OmegaConf turns lr=0 into 0.0, the message says lr=0.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return UserError(f"{key}={value}: must be {self.allowed}")


def knob(default, allowed: str, **limits) -> Any:
    """A dataclass field that carries its Knob (types come from the annotation)."""
    return field(default=default, metadata={"knob": Knob(allowed, **limits)})


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
    """Set by the sweeper for each trial (see lenet_sweep.protocol); null for a single run."""

    number: int | None = None
    name: str | None = None  # the MLflow run name, e.g. "t003 lr=0.0826 ep=12"
    study_name: str | None = None
    parent_run_id: str | None = None


@dataclass
class RunConfig:
    """The top-level knobs of one training run (defaults and comments: conf/config.yaml)."""

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
    """Store the schema (conf/config.yaml extends it) and the `project_root` resolver.

    Called where the Hydra app is defined (lenet_sweep.__main__), as Hydra's docs do, and by
    anything that composes the config itself (the tests).
    """
    ConfigStore.instance().store(name="lenet_sweep_schema", node=RunConfig)
    # Hydra's run/sweep dirs use ${project_root:} so outputs land in <project>/outputs.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def knobs(schema, prefix: str = "") -> dict[str, Knob]:
    """Every knob of a schema by its dotted key, nested dataclasses included."""
    found, hints = {}, typing.get_type_hints(schema)
    for f in fields(schema):
        if "knob" in f.metadata:
            kind = [
                t for t in typing.get_args(hints[f.name]) or [hints[f.name]] if t is not type(None)
            ]
            found[prefix + f.name] = dataclasses.replace(f.metadata["knob"], kind=kind[0])
        elif f.default_factory is not NO_FACTORY and is_dataclass(f.default_factory):
            found.update(knobs(f.default_factory, f"{prefix}{f.name}."))
    return found


def check_knobs(node, schema, prefix: str = "") -> None:
    """Every knob's range, read from a config or a settings object; null passes."""
    for key, rule in knobs(schema, prefix).items():
        value = functools.reduce(getattr, key.removeprefix(prefix).split("."), node)
        if value is not None:
            rule.check(key, value)


def validate(cfg) -> None:
    """A run's config, before anything is trained or recorded."""
    check_knobs(cfg, RunConfig)
    rules = knobs(RunConfig)
    limits = {"batch_size": cfg.data.train_size or cfg.data.num_train,
              "data.train_size": cfg.data.num_train, "data.test_size": cfg.data.num_test}  # fmt: skip
    for key, limit in limits.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value > limit:
            raise UserError(f"{rules[key].error(key, value)} ({limit} here)")
    if not cfg.mlflow.experiment:
        raise UserError("mlflow.experiment='': must be a name, e.g. mlflow.experiment=lenet_sweep")


GROUPS = ("model", "optimizer", "data")


def check_search_space(space: dict, group_options: Callable[[str], list[str]]) -> None:
    """A sweep's distributions against the knobs' types and ranges and the groups' options,
    before any study or run exists (else every trial would fail the same way)."""
    from optuna.distributions import FloatDistribution

    rules = knobs(RunConfig)
    for key, dist in space.items():
        values = list(getattr(dist, "choices", None) or (dist.low, dist.high))
        shown = f"{key}: searched over {_shown(dist)}"
        if key in GROUPS:
            options = group_options(key)
            for value in values:
                if value not in options:
                    raise UserError(
                        f"{shown}; {value} is not a {key}, choose from {', '.join(options)}"
                    )
        elif rule := rules.get(key):
            if not all(_fits(rule.kind, v) for v in values) or (
                rule.kind is int and isinstance(dist, FloatDistribution)
            ):
                raise UserError(f"{shown}, but {key} must be {rule.allowed}; "
                                "for integers use int(interval(a, b)) or range(a, b)")  # fmt: skip
            for value in values:
                try:
                    rule.check(key, value)
                except UserError:
                    raise UserError(f"{shown}, but {key} must be {rule.allowed}") from None


def check_sweep(cfg, space: dict, group_options: Callable[[str], list[str]]) -> None:
    """This project's hydra.sweeper.app_checks: the fixed values every trial shares, the device,
    and the search space, before the sweep starts."""
    validate(cfg)
    resolve_device(cfg.device)
    check_search_space(space, group_options)


def _fits(kind: type, value) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int) if kind is int else isinstance(value, kind | int)


def _shown(dist) -> str:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"choice({', '.join(map(str, dist.choices))})"
    kind = "integers" if isinstance(dist, IntDistribution) else "floats"
    return f"{'log-scaled ' if dist.log else ''}{kind} in [{dist.low}, {dist.high}]"


def knob_error(error: BaseException | None, rules: dict[str, Knob]) -> UserError | None:
    """A type error from composition (`lr=abc`) as that knob's own message, else None."""
    while error is not None and not isinstance(error, ValidationError):
        error = error.__cause__ or error.__context__
    rule = rules.get(str(error.full_key)) if error is not None else None
    return rule.error(str(error.full_key), error.value) if rule else None


def autocast_dtype(precision: str):
    """`precision` -> the dtype the steps autocast to (None: plain fp32). Weights, optimizer
    state and the loss stay fp32 either way."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16}[str(precision)]


def resolve_device(name: str):
    """`device` -> torch.device: auto, cpu, cuda, cuda:N (the one place that reads the grammar)."""
    import torch

    name, cuda = str(name), re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if name in ("auto", "cpu"):
        return torch.device("cuda:0" if name == "auto" and torch.cuda.is_available() else "cpu")
    if cuda is None:
        raise UserError(f"device={name}: unknown device; allowed: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device={name}: no CUDA GPU is visible here; use device=cpu or auto")
    if int(cuda[1] or 0) >= torch.cuda.device_count():
        raise UserError(f"device={name}: only {torch.cuda.device_count()} GPU(s) visible; "
                        "use cuda:0 .. cuda:N-1, or auto")  # fmt: skip
    return torch.device("cuda", int(cuda[1] or 0))
