"""Hydra's sweep grammar -> Optuna distributions (the official sweeper's mapping, on Optuna 5).

tag(log, interval(a, b))   FloatDistribution(a, b, log=True)   (ints: IntDistribution, log)
interval(a, b)             FloatDistribution(a, b)             (int(interval(..)): IntDistribution)
range(a, b[, s])           IntDistribution(a, last, step=s)    end exclusive, as in Hydra
                           (inclusive_range_end: up to b, as the official plugin)
choice(x, y, ...)          CategoricalDistribution([x, y, ...])
anything else              a fixed value passed to every job
"""

from __future__ import annotations

from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lenet_sweep.errors import UserError


def _choices(override: Override) -> list:
    return list(override.sweep_iterator(transformer=Transformer.encode))


def _range(key: str, value: RangeSweep, inclusive: bool) -> BaseDistribution:
    start, stop, step = value.start, value.stop, value.step
    if step == 0 or (stop - start) / step <= 0:
        raise UserError(
            f"{key}=range({start}, {stop}, {step}): empty range; "
            "give start < stop (the end is exclusive) and a positive step"
        )
    count = int(-(-(stop - start) // step))  # ceil: number of values before `stop`
    last = stop if inclusive else start + (count - 1) * step  # inclusive: the official plugin's
    if any(isinstance(v, float) for v in (start, stop, step)):
        return FloatDistribution(float(start), float(last), step=float(step))
    return IntDistribution(int(start), int(last), step=int(step))


def _interval(key: str, value: IntervalSweep) -> BaseDistribution:
    low, high, log = value.start, value.end, "log" in value.tags
    if not low < high:
        raise UserError(f"{key}=interval({low}, {high}): empty interval; give low < high")
    if log and low <= 0:
        raise UserError(f"{key}=tag(log, interval({low}, {high})): log scale needs low > 0")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def distribution(override: Override, inclusive_range_end: bool = False) -> BaseDistribution | str:
    """One parsed override -> its distribution, or its value as a string when it is fixed."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    key, value = override.get_key_element(), override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = _choices(override)
        if not choices:
            raise UserError(f"{key}: empty choice(); give at least one value")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        return _range(key, value, inclusive_range_end)
    if isinstance(value, IntervalSweep):
        return _interval(key, value)
    raise UserError(f"{key}: sweep {value} is not supported; use choice, range or interval")


def parse(
    arguments: list[str], inclusive_range_end: bool = False
) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Overrides (sweeper params first, command line after) -> (search space, fixed values)."""
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except HydraException as e:
        raise UserError(
            f"bad sweep override ({str(e).splitlines()[0]}); see Hydra's grammar"
        ) from e
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        result = distribution(override, inclusive_range_end)
        space.pop(key, None)  # later arguments win
        fixed.pop(key, None)
        if isinstance(result, BaseDistribution):
            space[key] = result
        else:
            fixed[key] = result
    return space, fixed


def grid_choices(space: dict[str, BaseDistribution]) -> dict[str, list]:
    """GridSampler needs every value listed: only discrete distributions qualify."""
    grid = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution | FloatDistribution) and dist.step and not dist.log:
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[key] = [dist.low + i * dist.step for i in range(count)]
        else:
            raise UserError(
                f"{key}: the grid sampler needs a discrete search space; use choice() or range()"
            )
    return grid


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Sample one parameter from a prepared distribution through Trial's public API."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def describe(space: dict[str, BaseDistribution]) -> str:
    """`lr log [0.01, 3], epochs [1, 20]`: the search space as the sweep's first line shows it."""
    shown = []
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            shown.append(f"{key} in {{{', '.join(map(str, dist.choices))}}}")
            continue
        step = f" step {dist.step:g}" if dist.step and dist.step != 1 else ""
        shown.append(f"{key}{' log' if dist.log else ''} [{dist.low:g}, {dist.high:g}]{step}")
    return ", ".join(shown) or "none (fixed values only)"


def format_value(value: Any) -> str:
    """A value as a Hydra override value (strings quoted)."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    return repr(value)
