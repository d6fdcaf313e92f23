"""A run's MLflow params (the flat form of the config's identity and knobs), and whether a
resume may continue an existing run."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Mapping

from lenet_sweep import PROJECT_ROOT
from lenet_sweep.errors import mask_url

KNOBS = ("epochs", "precision", "seeds")  # what a researcher compares besides the identity


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"}, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_params(shaping: dict, knobs: Mapping, choices: Mapping[str, str]) -> dict[str, object]:
    """What a researcher sweeps and compares, each once: the identity's values (`shaping`,
    lenet_sweep.config.identity) and the other `knobs`, the model and optimizer by name with
    their settings (not `optimizer.lr`, that is `lr`), the data by name with the slice sizes
    used. Bookkeeping (checksums, paths, trial.*) stays in config.yaml."""
    params: dict[str, object] = {k: v for k, v in shaping.items() if not isinstance(v, dict)}
    params.update(knobs)
    for group in ("model", "optimizer"):
        settings = shaping[group]
        params[group] = choices.get(group) or str(settings["_target_"]).rsplit(".", 1)[-1].lower()
        shown = {k: v for k, v in settings.items() if not k.startswith("_") and k != "lr"}
        params.update({f"{group}.{k}": v for k, v in shown.items()})
    data = shaping["data"]
    params["data"] = data["name"]
    params["data.train_size"] = data["train_size"] or data["num_train"]
    params["data.test_size"] = data["test_size"] or data["num_test"]
    return params


def as_logged(params: Mapping[str, object]) -> dict[str, str]:
    """Params as MLflow keeps them: text, credentials masked, cut at MLflow's 6000 characters."""
    return {k: str(mask_url(str(v)))[:6000] for k, v in params.items()}


def continuable(client, run_id: str | None, params: dict[str, str]) -> str | None:
    """`run_id` when a resume may continue that run: it is not FINISHED and was logged with the
    same params (MLflow params cannot change). Else None: the resume becomes a new run."""
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or another store
        return None
    same = run.data.params == as_logged(params)
    return run_id if same and run.info.status != "FINISHED" else None


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit, read once per process: the code a process runs is what it
    imported (a fused sweep asks once per trial)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
