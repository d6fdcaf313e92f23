"""A run's and a sweep's checks before anything is trained or recorded: the knobs' ranges, the
device, the search space against the knobs' types and the groups' options."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import fields

from omegaconf import OmegaConf

from lenet_sweep.config.knobs import check_knobs, knobs
from lenet_sweep.config.schema import RunConfig
from lenet_sweep.errors import UserError

GROUPS = ("model", "optimizer", "data")


def validate(cfg) -> None:
    """A run's config, before anything is trained or recorded."""
    check_knobs(cfg, RunConfig)
    known = [f.name for f in fields(RunConfig)]
    for key in cfg:
        if key not in (*known, "hydra"):  # +key=value: a key nothing reads
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"+{key}: no such key in the config, nothing would read it{hint}")
    rules = knobs(RunConfig)
    limits = {
        "batch_size": cfg.data.train_size or cfg.data.num_train,
        "data.train_size": cfg.data.num_train,
        "data.test_size": cfg.data.num_test,
    }
    for key, limit in limits.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value > limit:
            raise UserError(f"{rules[key].error(key, value)} ({limit} here)")
    held = validation_size(cfg)
    if held and held + (cfg.data.train_size or 1) > cfg.data.num_train:
        raise UserError(
            f"data.val_size={held}: leaves {cfg.data.num_train - held} training images, fewer "
            f"than data.train_size={cfg.data.train_size}; lower one of them"
        )
    if cfg.seeds > 1 and cfg.resume:
        raise UserError(
            f"resume={cfg.resume}: a run of seeds={cfg.seeds} keeps no checkpoint to go on from; "
            "rerun it, or resume a run of one seed"
        )
    if not cfg.mlflow.experiment:
        raise UserError("mlflow.experiment='': must be a name, e.g. mlflow.experiment=lenet_sweep")


def validation_size(cfg) -> int:
    """How many training images the run holds out to validate: data.val_size; null: a twelfth
    of the training images it uses in a sweep's trial (55,000 / 5,000 of 60,000, as
    lightning-hydra-template splits), none in a single run (train_ch6 trains on all)."""
    if cfg.data.val_size is not None:
        return int(cfg.data.val_size)
    in_sweep = cfg.trial.number is not None
    return (cfg.data.train_size or cfg.data.num_train) // 12 if in_sweep else 0


def check_search_space(space: dict, group_options: Callable[[str], list[str]]) -> None:
    """A sweep's distributions against the knobs' types and ranges and the groups' options,
    before any study or run exists (else every trial would fail the same way)."""
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
            _check_searched_knob(key, rule, dist, values, shown)


def _check_searched_knob(key: str, rule, dist, values: list, shown: str) -> None:
    from optuna.distributions import FloatDistribution

    if not all(_fits(rule.kind, v) for v in values) or (
        rule.kind is int and isinstance(dist, FloatDistribution)
    ):
        raise UserError(
            f"{shown}, but {key} must be {rule.allowed}; "
            "for integers use int(interval(a, b)) or range(a, b)"
        )
    for value in values:
        try:
            rule.check(key, value)
        except UserError:
            raise UserError(f"{shown}, but {key} must be {rule.allowed}") from None


def check_sweep(cfg, space: dict, group_options: Callable[[str], list[str]]) -> None:
    """This project's checks of a sweep (job.sweep_app): the fixed values every trial shares,
    the device, and the search space, before the sweep starts."""
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
        raise UserError(
            f"device={name}: only {torch.cuda.device_count()} GPU(s) visible; "
            "use cuda:0 .. cuda:N-1, or auto"
        )
    return torch.device("cuda", int(cuda[1] or 0))
