"""The Hydra task: one training run, recorded in MLflow; returns the final test accuracy."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from pathlib import Path

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import tracking
from lenet_sweep.data import load_split
from lenet_sweep.errors import UserError
from lenet_sweep.models import init_xavier
from lenet_sweep.train import Diverged, TrainResult, train
from lenet_sweep.trial_link import TrialLink

log = logging.getLogger("lenet_sweep")


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name}: no CUDA GPU is visible here; use device=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device={name}: only {torch.cuda.device_count()} GPU(s) visible; "
                "use cuda:0 .. cuda:N-1, or auto"
            )
        return torch.device("cuda", index)
    raise UserError(f"device={name}: unknown device; allowed: auto, cpu, cuda, cuda:N")


def _hydra_info() -> tuple[str | None, list[str]]:
    """This job's output dir and its user overrides (without the sweeper's trial.* plumbing)."""
    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("trial.")]
    return hc.runtime.output_dir, overrides


def _run_name(cfg: DictConfig, overrides: list[str]) -> str | None:
    if cfg.mlflow.run_name:
        return str(cfg.mlflow.run_name)
    if cfg.trial.number is None:
        return None  # MLflow picks a name
    parts = [f"t{int(cfg.trial.number):03d}"]
    for override in overrides:
        key, _, value = override.partition("=")
        with contextlib.suppress(ValueError):  # numbers shortened, names kept
            value = value if value.isdigit() else f"{float(value):.3g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: runs end KILLED, the checkpoint stays."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"received signal {signum}")


def run(cfg: DictConfig) -> float:
    """Train once and record it; returns the final test accuracy (the sweep objective)."""
    device = resolve_device(cfg.device)
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.prepare_experiment(uri, cfg.mlflow.experiment)
    link = TrialLink.from_config(cfg.trial)

    # Data and model first: bad input fails before any MLflow run exists.
    train_split = load_split(cfg.data, train=True, device=device)
    test_split = load_split(cfg.data, train=False, device=device)
    torch.manual_seed(cfg.seed)
    net = hydra.utils.instantiate(cfg.model)
    net.apply(init_xavier)
    net.to(device)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(net.parameters())

    output_dir, overrides = _hydra_info()
    tags = {"device": str(device), "mlflow.source.name": "lenet_sweep"}
    if output_dir:
        tags["hydra.output_dir"] = output_dir
    if overrides:
        tags["hydra.overrides"] = " ".join(overrides)
    if commit := tracking.git_commit():
        tags["mlflow.source.git.commit"] = commit
    if link is not None:
        tags.update(
            {
                "mlflow.parentRunId": str(cfg.trial.parent_run_id),
                "optuna.study_name": str(cfg.trial.study_name),
                "optuna.trial_number": str(link.number),
            }
        )
    elif cfg.trial.parent_run_id:
        tags["mlflow.parentRunId"] = str(cfg.trial.parent_run_id)

    checkpoint = Path(output_dir) / "checkpoint.pt" if output_dir else None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with tracking.TrackedRun(uri, experiment_id, _run_name(cfg, overrides), tags) as mlrun:
            if link is not None:
                link.set_attr("mlflow_run_id", mlrun.run_id)
            mlrun.log_params(tracking.config_params(cfg))
            mlrun.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

            def on_epoch(stats: dict, result: TrainResult) -> None:
                epoch = stats["epoch"]
                mlrun.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
                if link is not None and link.report(stats["test_acc"], epoch):
                    mlrun.set_tags({"optuna.trial_state": "PRUNED", "pruned_at_epoch": epoch})
                    _log_summary(mlrun, result)
                    raise optuna.TrialPruned(f"pruned after epoch {epoch}")

            log.info("training on %s", device)
            try:
                result = train(
                    net,
                    optimizer,
                    train_split,
                    test_split,
                    epochs=cfg.epochs,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed,
                    device=device,
                    progress=cfg.progress,
                    on_epoch=on_epoch,
                    checkpoint_path=checkpoint,
                )
            except optuna.TrialPruned:
                mlrun.status = "FINISHED"  # a pruned trial is a normal end, marked by its tag
                raise
            except Diverged as e:
                mlrun.log_metrics({"train_loss": e.loss}, step=e.epoch)
                mlrun.set_tags({"diverged": "true", "diverged_at_epoch": e.epoch})
                raise
            _log_summary(mlrun, result)
            final = result.final
            log.info(
                "loss %.3f, train acc %.3f, test acc %.3f",
                final["train_loss"],
                final["train_acc"],
                final["test_acc"],
            )
            log.info("%.1f examples/sec on %s", result.examples_per_sec, device)
            if link is not None:
                mlrun.set_tags({"optuna.trial_state": "COMPLETE"})
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not math.isfinite(final["test_acc"]):
        raise Diverged(final["epoch"], final["test_acc"])
    return float(final["test_acc"])


def _log_summary(mlrun: tracking.TrackedRun, result: TrainResult) -> None:
    mlrun.log_metrics(
        {
            "examples_per_sec": result.examples_per_sec,
            "train_time_s": result.train_time_s,
            "epochs_run": len(result.history),
        }
    )
    if result.history:
        mlrun.log_figure(tracking.curves_figure(result.history), "training_curves.png")
