"""The Hydra task: one training run, recorded in MLflow; returns the final test accuracy."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import OUTPUTS_DIR, schema, signals, tracking
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


def build(cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The configured net, seeded and Xavier-initialised as train_ch6 does, and its optimizer."""
    torch.manual_seed(cfg.seed)
    net = hydra.utils.instantiate(cfg.model)
    net.apply(init_xavier)
    net.to(device)
    return net, hydra.utils.instantiate(cfg.optimizer)(net.parameters())


def run(cfg: DictConfig) -> float:
    """Train once and record it; returns the final test accuracy (the sweep objective)."""
    schema.validate(cfg)
    device = resolve_device(cfg.device)
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = tracking.prepare_experiment(uri, cfg.mlflow.experiment)
    tracking.repair_orphaned_runs(uri, experiment_id)
    link = TrialLink.from_config(cfg.trial)

    # Data and model first: bad input fails before any MLflow run exists.
    train_split = load_split(cfg.data, train=True, device=device)
    test_split = load_split(cfg.data, train=False, device=device)
    net, optimizer = build(cfg, device)

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
    resume = load_resume(cfg) if cfg.resume else None
    run_id = resume["mlflow_run_id"] if resume else None
    with (
        signals.stop_on_signals(),
        tracking.TrackedRun(uri, experiment_id, _run_name(cfg, overrides), tags, run_id) as mlrun,
    ):
        if link is not None:
            link.set_attr("mlflow_run_id", mlrun.run_id)
        if resume is None:
            mlrun.log_params(tracking.config_params(cfg))
            mlrun.log_text(tracking.mask_url(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
        else:
            _relog_missing_epochs(mlrun, resume["history"])
            log.info("resuming %s after epoch %d", resume["path"], resume["epoch"])

        def on_epoch(stats: dict, result: TrainResult) -> None:
            epoch = stats["epoch"]
            mlrun.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
            if link is not None and link.report(stats["test_acc"], epoch):
                mlrun.set_tags({"optuna.trial_state": "PRUNED", "pruned_at_epoch": epoch})
                _log_summary(mlrun, result)
                mlrun.status = "FINISHED"  # a pruned trial is a normal end, marked by its tag
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
                checkpoint_extra={"mlflow_run_id": mlrun.run_id, "identity": _identity(cfg)},
                resume=resume,
                divergence_threshold=cfg.divergence_threshold,
            )
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
            link.set_attr("train_time_s", result.train_time_s + result.eval_time_s)
    return float(final["test_acc"])


# What must match for a checkpoint to be resumed: everything that shapes the numbers.
_IDENTITY_KEYS = ("model", "optimizer", "data", "lr", "batch_size", "seed")


def _identity(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml({k: cfg[k] for k in _IDENTITY_KEYS}, resolve=True)


def find_checkpoint(spec: str) -> Path:
    """resume=<run dir> | <checkpoint file> | last -> the checkpoint file."""
    if spec == "last":
        found = sorted(
            (OUTPUTS_DIR / "runs").glob("*/*/checkpoint.pt"), key=lambda p: p.stat().st_mtime
        )
        if not found:
            raise UserError(
                f"resume=last: no checkpoint under {OUTPUTS_DIR / 'runs'}; give resume=<run dir>"
            )
        return found[-1]
    path = Path(spec).expanduser()
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"resume={spec}: no checkpoint.pt there; give a run's output dir or `last`")
    return path


def load_resume(cfg: DictConfig) -> dict:
    """The checkpoint to continue from, checked against this run's config."""
    path = find_checkpoint(str(cfg.resume))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # noqa: BLE001 - torn or foreign file
        raise UserError(
            f"resume: {path} is not a lenet_sweep checkpoint ({type(e).__name__}); give another run"
        ) from e
    if state.get("identity") != _identity(cfg):
        raise UserError(
            f"resume: {path} was made with another model/optimizer/data/lr/batch_size/seed; "
            "resume with the same settings (see that run's .hydra/config.yaml)"
        )
    if state["epoch"] >= cfg.epochs:
        raise UserError(
            f"resume: {path} already has {state['epoch']} epochs; raise epochs to train on"
        )
    return {**state, "path": path}


def _relog_missing_epochs(mlrun: tracking.TrackedRun, history: list[dict]) -> None:
    """A kill between checkpoint and metric write loses an epoch's metrics: write them now."""
    logged = {m.step for m in mlrun.client.get_metric_history(mlrun.run_id, "test_acc")}
    for stats in history:
        if stats["epoch"] not in logged:
            mlrun.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=stats["epoch"])


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
