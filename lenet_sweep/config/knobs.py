"""Knobs: what a user may set, each with its type (from the dataclass field) and allowed range,
declared once next to its field, and the one-line message `key=value: must be <allowed>`."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import MISSING as NO_FACTORY
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf.errors import ValidationError

from lenet_sweep.errors import UserError, causes


@dataclass(frozen=True)
class Knob:
    """What a user may set: `allowed` completes the message `key=value: must be <allowed>`."""

    allowed: str
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    choices: tuple = ()
    kind: type | None = None  # from the field's annotation, filled in by knobs()
    help: str = ""  # what it means, for --help

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


def knob(default, allowed: str, help: str = "", **limits) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field that carries its Knob (types come from the annotation)."""
    return field(default=default, metadata={"knob": Knob(allowed, help=help, **limits)})


def knobs(schema, prefix: str = "") -> dict[str, Knob]:
    """Every knob of a schema by its dotted key, nested dataclasses included."""
    found, hints = {}, typing.get_type_hints(schema)
    for f in fields(schema):
        if "knob" in f.metadata:
            kinds = typing.get_args(hints[f.name]) or [hints[f.name]]
            kind = [t for t in kinds if t is not type(None)][0]
            found[prefix + f.name] = dataclasses.replace(f.metadata["knob"], kind=kind)
        elif f.default_factory is not NO_FACTORY and is_dataclass(f.default_factory):
            found.update(knobs(f.default_factory, f"{prefix}{f.name}."))
    return found


def keys(schema, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, nested dataclasses included (what a typo is matched to)."""
    found = []
    for f in fields(schema):
        if f.default_factory is not NO_FACTORY and is_dataclass(f.default_factory):
            found += keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            found.append(prefix + f.name)
    return found


def check_knobs(node, schema, prefix: str = "") -> None:
    """Every knob's range, read from a config or a settings object; null passes."""
    for key, rule in knobs(schema, prefix).items():
        value = functools.reduce(getattr, key.removeprefix(prefix).split("."), node)
        if value is not None:
            rule.check(key, value)


def knob_error(error: BaseException | None, rules: dict[str, Knob]) -> UserError | None:
    """A type error from composition (`lr=abc`) as that knob's own message, else None."""
    error = next((e for e in causes(error) if isinstance(e, ValidationError)), None)
    rule = rules.get(str(error.full_key)) if error is not None else None
    return rule.error(str(error.full_key), error.value) if rule else None
