"""What identifies a run's config: the settings that shape its numbers, defined once.

A checkpoint resumes only into the same identity; fused members share it but for what each
member has of its own; MLflow's params are its flat form.
"""

from __future__ import annotations

from omegaconf import OmegaConf

is_config = OmegaConf.is_config
SHAPING = ("model", "optimizer", "data", "lr", "batch_size", "seed")
PER_MEMBER = ("lr", "seed")  # what the members of one fused group may differ in (and epochs)
# What a fused group also shares: where and how its one step runs.
STEP = ("device", "cuda_graph", "precision", "seeds")
# In run names, which the MLflow UI's runs table cuts: short keys; paths and checksums left out.
_SHORT = {"epochs": "ep", "batch_size": "bs"}
_UNNAMED = ("lr", "epochs", "model", "optimizer", "data.root", "data.system_root", "data.sha256")


def setting(key: str, value) -> str:
    """`ep=12`, `lr=0.0826`, `train_size=256`: one setting as run names show it."""
    key = key.rsplit(".", 1)[-1]
    return f"{_SHORT.get(key, key)}={f'{value:.3g}' if isinstance(value, float) else value}"


def run_name(cfg, model: str, optimizer: str, overrides) -> str:
    """`lenet sgd lr=0.9 ep=10`, then each other setting the overrides change that shapes the
    numbers: runs that differ only in data.train_size get names that differ."""
    changed = {}
    for override in overrides:
        key, _, given = override.lstrip("+~").partition("=")
        if key.split(".")[0] in (*SHAPING, *STEP[2:], "epochs") and key not in _UNNAMED:
            value = OmegaConf.select(cfg, key, default=given)
            changed[key] = given if is_config(value) else value  # a group: its option's name
    shown = (setting(key, value) for key, value in changed.items())
    return " ".join([model, optimizer, f"lr={cfg.lr:g}", f"ep={cfg.epochs}", *shown])


def identity(cfg) -> dict:
    """The settings that shape a run's numbers, resolved to plain values."""
    shaping = {}
    for key in SHAPING:
        value = cfg[key]
        shaping[key] = OmegaConf.to_container(value, resolve=True) if is_config(value) else value
    return shaping


def identity_text(cfg) -> str:
    """`identity` as YAML: what a checkpoint records and is checked against."""
    return OmegaConf.to_yaml({k: cfg[k] for k in SHAPING}, resolve=True)


def group_key(cfg) -> str:
    """What the members of one fused group must share: the identity but each member's own
    (lr, seed; the optimizer's lr is `lr`), and how the step runs."""
    shared = {k: v for k, v in identity(cfg).items() if k not in PER_MEMBER}
    shared["optimizer"] = {k: v for k, v in shared["optimizer"].items() if k != "lr"}
    shared.update({k: cfg[k] for k in STEP})
    return OmegaConf.to_yaml(shared)
