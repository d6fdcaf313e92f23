"""What Hydra needs before it composes: the schema in its ConfigStore, and the resolvers
conf/config.yaml uses."""

from __future__ import annotations

import os

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lenet_sweep import PROJECT_ROOT
from lenet_sweep.config.help import page
from lenet_sweep.config.schema import RunConfig


def register() -> None:
    """Store the schema (conf/config.yaml extends it) and the resolvers.

    Called where the Hydra app is defined (lenet_sweep.cli), as Hydra's docs do, and by
    anything that composes the config itself (the tests).
    """
    ConfigStore.instance().store(name="lenet_sweep_schema", node=RunConfig)
    resolvers = {
        # outputs land in <project>/outputs (the checkout, or where an installed package starts)
        "project_root": lambda: str(PROJECT_ROOT),
        "pid": lambda: str(os.getpid()),  # in a run's dir: runs started in one second differ
        "help_page": page,  # --help (hydra.help.template)
        "log_format": _log_format,  # by hydra.mode: a run's lines plain, a sweep's timed
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _log_format(mode) -> str:
    return "[%(asctime)s] %(message)s" if "MULTIRUN" in str(mode) else "%(message)s"
