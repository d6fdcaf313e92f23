"""Hydra's Sweeper plugin for lenet_sweep's Optuna sweep: builds the launcher and delegates
(lenet_sweep.sweep.loop)."""

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from lenet_sweep.config.plugins import LenetOptunaSweeperConf
from lenet_sweep.errors import UserError, exit_with


class LenetOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = LenetOptunaSweeperConf(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.config_loader = config, hydra_context.config_loader
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        from lenet_sweep.sweep.loop import OptunaSweep

        try:
            options = self.config_loader.get_group_options
            sweep = OptunaSweep(self.settings, self.config, self.launcher, options)
            sweep.run(arguments)
        except UserError as e:
            exit_with(e)
