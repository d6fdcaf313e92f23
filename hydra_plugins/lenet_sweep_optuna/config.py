"""Registers the sweeper's settings (lenet_sweep.config.plugins) in Hydra's ConfigStore.

Hydra imports every module under hydra_plugins when it starts, so the store() below runs before
any config is composed: `override hydra/sweeper: lenet_optuna` finds it in any Hydra app.
"""

from hydra.core.config_store import ConfigStore

from lenet_sweep.config.plugins import PRUNERS, SAMPLERS, LenetOptunaSweeperConf

_store = ConfigStore.instance()
_store.store(
    group="hydra/sweeper", name="lenet_optuna", node=LenetOptunaSweeperConf, provider="lenet_sweep"
)
for _group, _nodes in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
    for _name, _node in _nodes.items():
        _store.store(
            group=f"hydra/sweeper/{_group}", name=_name, node=_node, provider="lenet_sweep"
        )
