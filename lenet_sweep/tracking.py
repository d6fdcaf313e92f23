"""MLflow: where runs go, and one run's record (params, per-epoch metrics, artifacts, status)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lenet_sweep import OUTPUTS_DIR, PROJECT_ROOT
from lenet_sweep.errors import UserError
from lenet_sweep.masking import mask_url

# Fail fast on an unreachable tracking server instead of retrying for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

HOST = socket.gethostname()


def default_tracking_uri() -> str:
    return f"sqlite:///{OUTPUTS_DIR / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else the project's sqlite store (absolute path)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path would split runs across stores by cwd: anchor it to the project.
        uri = f"sqlite:///{(PROJECT_ROOT / uri[len('sqlite:///') :]).resolve()}"
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (MLflow's default, ./mlruns, depends on the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides where its artifacts go
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()


def prepare_experiment(uri: str, name: str) -> str:
    """Create the store and the experiment once (parallel first writers to new sqlite fail)."""
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///") :]) or ".", exist_ok=True)
    try:
        mlflow_client = client(uri)
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return mlflow_client.create_experiment(name, artifact_location=_artifact_root(uri))
        except Exception:  # noqa: BLE001 - another process created it first
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI, locked store...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"MLflow tracking URI {mask_url(uri)} is not usable ({type(e).__name__}: "
            f"{mask_url(first_line)}); start the server or set MLFLOW_TRACKING_URI / "
            "mlflow.tracking_uri to a reachable store"
        ) from e


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def repair_orphaned_runs(uri: str, experiment_id: str) -> list[str]:
    """Runs left RUNNING by a process of this host that is gone (kill -9, power loss) -> KILLED."""
    mlflow_client = client(uri)
    orphans = []
    for run in mlflow_client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    ):
        tags = run.data.tags
        if tags.get("lenet_sweep.host") == HOST and not pid_alive(
            int(tags.get("lenet_sweep.pid", 0))
        ):
            mlflow_client.set_terminated(run.info.run_id, status="KILLED")
            mlflow_client.set_tag(run.info.run_id, "lenet_sweep.repaired", "process died")
            orphans.append(run.info.run_id)
    return orphans


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


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The flattened composed config, credentials masked."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: mask_url(v) for k, v in flatten(container).items()}


def git_commit() -> str | None:
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


def curves_figure(history: list[dict]):
    """The seed's Animator at epoch resolution: train loss, train acc, test acc vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "-", label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    ax.plot(epochs, [h["test_acc"] for h in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    return fig


class TrackedRun:
    """One MLflow run, written through MlflowClient (no global fluent state, safe in workers).

    Used as a context manager: leaving it normally ends FINISHED, an interrupt ends KILLED,
    any other exception FAILED, so no run is ever left RUNNING by a Python-level exit.
    """

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        run_name: str | None,
        tags: dict,
        run_id: str | None = None,
    ):
        self.client = client(uri)
        tags = {k: mask_url(str(v)) for k, v in tags.items()}  # overrides may carry a password
        run_name = mask_url(run_name)
        if run_id is None:
            tags = {**tags, "lenet_sweep.host": HOST, "lenet_sweep.pid": str(os.getpid())}
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        else:  # resume into the same run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            tags = {**tags, "lenet_sweep.host": HOST, "lenet_sweep.pid": str(os.getpid())}
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        self.status: str | None = None  # set to force an end status (e.g. pruned = FINISHED)

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status = self.status
        if status is None:
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
                status = "KILLED"
            else:
                status = "FAILED"
            if exc_type is not None:
                self.set_tags({"error": f"{exc_type.__name__}: {mask_url(str(exc))}"[:5000]})
        self.client.set_terminated(self.run_id, status=status)
        return False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        )

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, mask_url(str(v))) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=tags)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_figure(self, figure, path: str) -> None:
        self.client.log_figure(self.run_id, figure, path)
