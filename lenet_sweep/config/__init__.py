"""Hydra config: the run's schema, the plugins' settings, the knobs' checks, a run's identity."""

from lenet_sweep.config.checks import (
    autocast_dtype,
    check_sweep,
    resolve_device,
    validate,
    validation_size,
)
from lenet_sweep.config.identity import group_key, identity, identity_text, run_name, setting
from lenet_sweep.config.knobs import keys, knob_error, knobs
from lenet_sweep.config.plugins import LAUNCHERS, FusedLauncherConf, LenetOptunaSweeperConf
from lenet_sweep.config.register import register
from lenet_sweep.config.schema import RunConfig
