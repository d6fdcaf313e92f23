"""Each fused trial's config as Hydra's `load_sweep_config` composes it, composed in full once
per set of config-group choices: a trial that differs only in values (lr=..., epochs=...,
trial.*=...) gets a copy of that composition with its values applied by Hydra's own override
step, and its own overrides list and override_dirname."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf


def _apply_value_overrides(overrides: list, cfg: DictConfig) -> None:
    """Hydra's own step that applies parsed value overrides to a composed config.

    Private API: Hydra's public load_sweep_config composes a whole config per job, the slow part
    of a large sweep's start (facebookresearch/hydra#1324) and of preparing fused trials;
    applying values to a copy of one composition is the step inside it. It can go when Hydra
    composes sweep jobs faster or offers this step publicly.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def _overrides_dirname(task: list, dirname) -> str:
    """hydra.job.override_dirname as Hydra computes it.

    Private API: the helper load_sweep_config uses, in Hydra's internal module; it goes with
    `_apply_value_overrides`.
    """
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return get_overrides_dirname(
        overrides=task,
        kv_sep=dirname.kv_sep,
        item_sep=dirname.item_sep,
        exclude_keys=dirname.exclude_keys,
    )


class Composer:
    """Trial configs for one sweep: the sweep's own overrides parsed once, each key classified
    once (a value, or something that changes what is composed)."""

    def __init__(self, config_loader, master: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader, self.master = config_loader, master
        self.composed: dict[tuple, DictConfig] = {}
        self.parser = OverridesParser.create()
        hydra_overrides = OmegaConf.to_container(master.hydra.overrides.hydra)
        self.master_hydra = self.parser.parse_overrides(hydra_overrides)
        self.kinds: dict[tuple, bool] = {}

    def _is_value(self, o) -> bool:
        """key=value or ++key=value on a config value (the sweeper's hydra.job.env_set too),
        not a group choice, an append or a delete: those change what is composed."""
        key = o.key_or_group
        kind = (key, o.package, o.is_add(), o.is_delete())
        if kind not in self.kinds:
            changes_composition = (
                o.package is not None
                or o.is_add()
                or o.is_delete()
                or "/" in key
                or key in self.master.hydra.runtime.choices
                or self.loader.repository.group_exists(key)
            )
            self.kinds[kind] = not changes_composition
        return self.kinds[kind]

    def __call__(self, overrides: list[str]) -> DictConfig:
        parsed = [*self.master_hydra, *self.parser.parse_overrides(overrides)]
        is_value = [self._is_value(o) for o in parsed]
        values = [o for o, v in zip(parsed, is_value, strict=True) if v]
        shape = tuple(o.input_line for o, v in zip(parsed, is_value, strict=True) if not v)
        key = (shape, tuple(o.key_or_group for o in values))
        if key not in self.composed:  # the first of its kind: composed as Hydra does
            self.composed[key] = self.loader.load_sweep_config(self.master, list(overrides))
            return copy.deepcopy(self.composed[key])
        cfg = copy.deepcopy(self.composed[key])
        _apply_value_overrides(values, cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.hydra = [o.input_line for o in parsed if o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in task]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = _overrides_dirname(task, dirname)
        return cfg
