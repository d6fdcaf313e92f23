"""Shared fixtures: configs composed once per call, small real data, one MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lenet_sweep import CONFIG_DIR, PROJECT_ROOT
from lenet_sweep import config as lenet_config

FASHION = Path("/usr/share/datasets/fashion-mnist")
# A slice of the real data: enough to learn something in one or two epochs on 2 cores.
SMALL = ["data.train_size=2048", "data.test_size=512", "epochs=1", "progress=false", "device=cpu"]


def pytest_configure(config):
    lenet_config.register()  # the schema lenet_sweep/conf/config.yaml extends, as the app registers it
    if not FASHION.is_dir():
        raise pytest.UsageError(
            f"{FASHION} is missing: apt-get install dataset-fashion-mnist (tests use the real data)"
        )


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the session (creating one costs seconds); tests use own experiments."""
    from lenet_sweep.tracking import store as tracking_store

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking_store.prepare_experiment(uri, "warmup")
    return uri


@pytest.fixture
def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_cfg(mlflow_uri, experiment):
    """compose(overrides) with the small-data defaults and the session's MLflow store."""

    def _make(*overrides: str):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    *SMALL,
                    f"mlflow.tracking_uri={mlflow_uri}",
                    f"mlflow.experiment={experiment}",
                    *overrides,
                ],
            )

    return _make


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd=None):
    """`python -m lenet_sweep ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "lenet_sweep", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or PROJECT_ROOT,
    )


def run_together(*arg_lists: list[str], timeout: int = 600, env: dict | None = None):
    """`python -m lenet_sweep ARGS` for each list, all started at once: (exit code, output) each."""
    full_env = {**os.environ, **(env or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lenet_sweep", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        for args in arg_lists
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def runs_of(mlflow_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def model_of(client, run):
    """The run's LoggedModel `model` (MLflow 3: on its experiment's Models tab) and its files."""
    models = client.search_logged_models([run.info.experiment_id], filter_string="name = 'model'")
    [model] = [m for m in models if m.source_run_id == run.info.run_id]
    return model, sorted(f.path for f in client.list_logged_model_artifacts(model.model_id))


# A grid of two trials: lr 1e-7 stays below 0.3 after epoch 1 and is pruned, lr 0.003 completes.
PRUNED_AND_COMPLETE = [
    "hydra/sweeper/sampler=grid",
    "hydra/sweeper/pruner=threshold",
    "hydra.sweeper.pruner.lower=0.3",
    "model=lenet_relu",
    "optimizer=adam",
    "lr=choice(0.003, 0.0000001)",
]
