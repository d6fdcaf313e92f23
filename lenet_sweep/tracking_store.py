"""Where MLflow runs go: the tracking URI, the experiment, and repair of runs of dead processes."""

from __future__ import annotations

import os
import socket

from lenet_sweep import OUTPUTS_DIR, PROJECT_ROOT
from lenet_sweep.errors import UserError, describe
from lenet_sweep.urls import SQLITE, mask_url, sqlite_path

HOST = socket.gethostname()
# Tags on every run we create, so a later start can tell a dead process's RUNNING run.
TAG_HOST, TAG_PID = "lenet_sweep.host", "lenet_sweep.pid"


def configure_env() -> None:
    """Fail fast on an unreachable tracking server instead of retrying for minutes (set by cli)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else the project's sqlite store (absolute path)."""
    uri = (
        configured
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"{SQLITE}{OUTPUTS_DIR / 'mlflow.db'}"
    )
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        # A relative sqlite path would split runs across stores by cwd: anchor it to the project.
        uri = f"{SQLITE}{(PROJECT_ROOT / path).resolve()}"
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (MLflow's default, ./mlruns, depends on the cwd)."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").resolve().as_uri()


def prepare_experiment(uri: str, name: str) -> str:
    """Create the store and the experiment once (parallel first writers to new sqlite fail)."""
    if path := sqlite_path(uri):
        os.makedirs(path.parent, exist_ok=True)
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
        raise UserError(
            f"MLflow tracking URI {mask_url(uri)} is not usable ({describe(e)}); start the server "
            "or set MLFLOW_TRACKING_URI / mlflow.tracking_uri to a reachable store"
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
        if tags.get(TAG_HOST) == HOST and not pid_alive(int(tags.get(TAG_PID, 0))):
            mlflow_client.set_terminated(run.info.run_id, status="KILLED")
            mlflow_client.set_tag(run.info.run_id, "lenet_sweep.repaired", "process died")
            orphans.append(run.info.run_id)
    return orphans
