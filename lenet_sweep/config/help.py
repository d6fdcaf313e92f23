"""`--help`: the app's own page (Hydra's help template, hydra.help.template), written from the
schema's knobs (their meaning and range) and the composed config (their values)."""

from __future__ import annotations

from omegaconf import OmegaConf

from lenet_sweep.config.knobs import knobs
from lenet_sweep.config.plugins import (
    LAUNCHERS,
    PRUNERS,
    SAMPLERS,
    FusedLauncherConf,
    LenetOptunaSweeperConf,
)
from lenet_sweep.config.schema import RunConfig

EXAMPLES = """\
  python -m lenet_sweep                                  d2l's train_ch6: LeNet, SGD lr 0.9, 10 epochs
  python -m lenet_sweep optimizer=adam lr=0.001 data.train_size=10000
  python -m lenet_sweep -m hydra.sweeper.n_trials=20 'lr=tag(log, interval(0.01, 3.0))'
  python -m lenet_sweep -m hydra/launcher=fused hydra.sweeper.n_jobs=16   16 trials as one model"""


def page(_root_) -> str:
    """The help page; `$APP_CONFIG_GROUPS` is Hydra's (the groups and their options)."""
    sweeper = knobs(LenetOptunaSweeperConf, "hydra.sweeper.")
    launcher = knobs(FusedLauncherConf, "hydra.launcher.")
    launchers = [
        f"  {name:<15}{what}" + (f" (pip install 'lenet_sweep[{extra[1]}]')" if extra else "")
        for name, (what, extra) in LAUNCHERS.items()
    ]
    text = "\n".join(
        [
            "lenet_sweep: d2l's LeNet on Fashion-MNIST (train_ch6) as a Hydra app; -m sweeps it",
            "with Optuna, MLflow records every run. Usage: python -m lenet_sweep [-m] [key=value]",
            "",
            "== Settings: key=value (as now), what it is (allowed) ==",
            *_rows(knobs(RunConfig), _root_),
            "",
            "== Groups: group=option ==",
            "$APP_CONFIG_GROUPS",
            "",
            "== Sweeps (-m): a search space as key=<sweep>, e.g. lr='interval(0.1, 1.0)',",
            "   epochs='range(1, 21)', optimizer='choice(sgd, adam)'; and the sweeper's settings ==",
            *_rows(sweeper, _root_),
            f"  hydra/sweeper/sampler={{{','.join(SAMPLERS)}}}",
            f"  hydra/sweeper/pruner={{{','.join(PRUNERS)}}}",
            "",
            "== Launchers: hydra/launcher=<name>, where a sweep's trials run ==",
            *launchers,
            *_rows(launcher, _root_),
            "",
            "== Examples ==",
            EXAMPLES,
            "",
            "The whole config: --cfg job. Hydra's own flags: --hydra-help.",
        ]
    )
    # Hydra fills the template in with string.Template: every other $ is a plain one.
    return text.replace("$", "$$").replace("$$APP_CONFIG_GROUPS", "$APP_CONFIG_GROUPS")


def _rows(found: dict, root) -> list[str]:
    rows = []
    for key, rule in found.items():
        value = OmegaConf.select(root, key, default=None)
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        setting, what = f"{key}={_yaml(shown)}", f"{rule.help} ({rule.allowed})"
        rows += (
            [f"  {setting:<32} {what}"] if len(setting) < 32 else [f"  {setting}", " " * 35 + what]
        )
    return rows


def _yaml(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
