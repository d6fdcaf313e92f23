"""Where MLflow runs go: the tracking URI, the experiment, and repair of runs of dead processes."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from lenet_sweep import OUTPUTS_DIR, PROJECT_ROOT
from lenet_sweep.db_files import SQLITE, check_sqlite, check_writable_dir, file_lock, sqlite_path
from lenet_sweep.errors import Outage, UserError, describe, mask_url, outage
from lenet_sweep.process import HOST, pid_alive

# Tags on every run we create, so a later start can tell a dead process's RUNNING run.
TAG_HOST, TAG_PID = "lenet_sweep.host", "lenet_sweep.pid"
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model
# training; this tag (read by the UI's experiment page) opens it on the runs table.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# The runs table the printed link opens: a view MLflow's UI reads from the experiment tag
# mlflow.sharedViewState.<key> (its "share view"), sorted by the objective, test_acc, which comes
# first among the columns with what the default search varies (by default the table shows no
# metric: every param and metric is behind "Show more columns").
VIEW_KEY = "lenet_sweep"
_COLUMNS = ["metrics.`test_acc`", "metrics.`val_acc`", "metrics.`train_acc`", "params.`lr`",
            "params.`epochs`", "attributes.`Dataset`", "attributes.`Models`"]  # fmt: skip
VIEW = json.dumps(
    {
        "orderByKey": _COLUMNS[0],
        "orderByAsc": False,
        "selectedColumns": _COLUMNS,
        "columnOrder": _COLUMNS,
    }
)


def configure_env() -> None:
    """Fail fast on an unreachable tracking server instead of retrying for minutes; MLflow's log
    records through the app's handlers, in its format (set by cli, before `import mlflow`)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # Not a "View run … at" line per run from a tracking server: the sweep prints its link once.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    _quiet()


def _quiet() -> None:
    """MLflow's INFO lines off (creating and migrating a store's tables), its warnings kept."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def _raised_anyway(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SQLAlchemy database error")


@functools.cache
def client(uri: str):
    """One MlflowClient per store and process: each new one builds its store again."""
    from mlflow.tracking import MlflowClient

    # MLflow's sqlite store logs a database error with its traceback, then raises it: we report
    # what it raises (as one line), so the log record is dropped.
    logging.getLogger("mlflow.store.db.utils").addFilter(_raised_anyway)
    _quiet()  # also in job processes that did not start from the CLI (submitit, Ray)

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (MLflow's default, ./mlruns, depends on the cwd)."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").resolve().as_uri()


def prepare_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating the store and the experiment on first use.

    A new sqlite store is built (tables and migrations) under its lock, so that runs and sweeps
    starting together never leave it half-migrated.
    """
    if not name:
        raise UserError("mlflow.experiment='': must be a name, e.g. mlflow.experiment=lenet_sweep")
    check_sqlite(uri, "MLflow store", "MLFLOW_TRACKING_URI / mlflow.tracking_uri", OUTPUTS_DIR)
    try:
        with file_lock(uri):
            mlflow_client = client(uri)  # the first client of a new store creates its tables
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                with contextlib.suppress(Exception):  # a server: another worker made it first
                    mlflow_client.create_experiment(name, _artifact_root(uri), {KIND_TAG: KIND})
                experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise RuntimeError(f"experiment {name!r} could not be created")
            tags = {KIND_TAG: KIND, f"mlflow.sharedViewState.{VIEW_KEY}": VIEW}
            for key, value in tags.items():  # made before we tagged, or by someone else
                if experiment.tags.get(key) != value:
                    with contextlib.suppress(Exception):  # a worker setting it at the same time
                        mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI, broken store...
        raise _store_error(uri, name, e) from e
    _check_artifacts(experiment.artifact_location)
    if experiment.lifecycle_stage != "active":
        raise UserError(
            f"mlflow.experiment={name}: the experiment is deleted in {mask_url(uri)}; restore it "
            f"(MLflow UI, or `mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}` with MLFLOW_TRACKING_URI set) or pick another "
            "mlflow.experiment"
        )
    return experiment.experiment_id


def _check_artifacts(location: str) -> None:
    """The model and figures go to the experiment's artifact folder when training ends: a folder
    that cannot be written is told now, before any training."""
    if location.startswith("file:"):  # a server's artifact store: its own requests check it
        folder = Path(url2pathname(urlparse(location).path))
        fix = "make it writable, or set mlflow.tracking_uri to a store in a writable folder"
        check_writable_dir(folder, f"MLflow artifacts go to {folder}", fix)


def _store_error(uri: str, name: str, error: Exception) -> UserError:
    text = str(error)
    if "_alembic_tmp" in text or re.search(r"table \S+ already exists", text):
        return UserError(
            f"the MLflow store {mask_url(uri)} is half-migrated ({describe(error)}); move the "
            "file aside (the next run makes a new one), or drop its _alembic_tmp_* tables and "
            f"run `mlflow db upgrade {mask_url(uri)}`"
        )
    if "experiment name" in text.lower():
        return UserError(f"mlflow.experiment={name}: not a usable name ({describe(error)})")
    if down := outage(error, sqlite_path(uri)):
        if sqlite_path(uri):
            return down  # the disk of the store is full
        return Outage(
            f"MLflow tracking URI {mask_url(uri)} is unreachable ({describe(error)}); start the "
            "server (or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri), then rerun the same "
            "command: nothing is lost, a sweep's study goes on"
        )
    return UserError(
        f"MLflow tracking URI {mask_url(uri)} is not usable ({describe(error)}); start the server "
        "or set MLFLOW_TRACKING_URI / mlflow.tracking_uri to a reachable store"
    )


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_link(uri: str, experiment_id: str) -> str:
    """How to see an experiment in the MLflow UI, on its runs table in our VIEW, as a whole
    address: a sqlite store's through the `mlflow ui` command that serves it (on its default
    address), a tracking server's on the server itself. MLflow 3.17's UI picks GenAI or
    model-training pages by the `workflowType` in the link, not the tag."""
    page = f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
    page += "&workflowType=machine_learning"
    if sqlite_path(uri):
        return f"mlflow ui --backend-store-uri {mask_url(uri)}, then open {UI_ADDRESS}{page}"
    server = re.sub(r"^(\w+://)[^@/]*@", r"\1", uri.rstrip("/"))  # no credentials in a link
    return f"{server}{page}"


_repaired: set[tuple[str, str]] = set()


def repair_orphaned_runs(uri: str, experiment_id: str) -> list[str]:
    """Runs left RUNNING by a process of this host that is gone (kill -9, power loss) -> KILLED.
    Once per store and process: later runs of the process (a sweep's trials) find it done."""
    if (uri, experiment_id) in _repaired:
        return []
    _repaired.add((uri, experiment_id))
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
