"""Shared fixtures: configs composed once per call, small real data, one MLflow store, a sweep
against fresh stores, a PostgreSQL server, a Ray cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir

from lenet_sweep import CONFIG_DIR, PROJECT_ROOT
from lenet_sweep import config as lenet_config
from lenet_sweep.tracking import backend as tracking_backend
from tests.servers import free_port, stop_processes_of

FASHION = Path("/usr/share/datasets/fashion-mnist")
# A slice of the real data: enough to learn something in one or two epochs on 2 cores.
SMALL = [
    "data.train_size=2048",
    "data.test_size=512",
    "epochs=1",
    "progress=false",
    "device=cpu",
    "hydra.sweeper.refit_seeds=0",
]  # sweeps end at their study: tests of the answer turn it on


def pytest_configure(config):
    lenet_config.register()  # the schema conf/config.yaml extends, as the app registers it
    if not FASHION.is_dir():
        raise pytest.UsageError(
            f"{FASHION} is missing: apt-get install dataset-fashion-mnist (tests use the real data)"
        )


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the session (creating one costs seconds); tests use own experiments."""
    from lenet_sweep.tracking import backend as tracking_backend

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking_backend.prepare_experiment(uri, "warmup")
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


@pytest.fixture
def sweep(tmp_path, mlflow_uri, experiment):
    """Runs `-m` sweeps against a fresh study store and this test's MLflow experiment."""
    tracking_backend.prepare_experiment(mlflow_uri, experiment)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    class Sweep:
        def __init__(self):
            self.storage, self.dir, self.study_name = storage, tmp_path / "multirun", "s"
            self.mlflow_uri, self.experiment = mlflow_uri, experiment

        def args(self, *extra: str) -> list[str]:
            return [
                "-m",
                *SMALL,
                f"hydra.sweeper.storage={self.storage}",
                f"hydra.sweeper.study_name={self.study_name}",
                f"hydra.sweep.dir={self.dir}",
                f"mlflow.tracking_uri={mlflow_uri}",
                f"mlflow.experiment={experiment}",
                *extra,
            ]

        def run(self, *extra: str, timeout: int = 600):
            return run_cli(*self.args(*extra), timeout=timeout)

        def trials(self):
            from lenet_sweep.sweep.study_db import open_storage  # journal:/// too

            storage_ = open_storage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage_)
            return study.get_trials(deepcopy=False)

        def wait_for(self, ready, timeout: float = 300) -> None:
            """Poll the study until `ready(trials)`, e.g. once a trial has reported an epoch."""
            deadline = time.time() + timeout
            while time.time() < deadline:
                time.sleep(0.1)
                try:
                    trials = self.trials()
                except Exception:  # study not created yet
                    continue
                if ready(trials):
                    return

        def killed_when(self, ready, *extra: str) -> int:
            """Start the sweep, kill -9 it once `ready(trials)`; returns its pid."""
            proc = subprocess.Popen(
                [sys.executable, "-m", "lenet_sweep", *self.args(*extra)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.wait_for(ready)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.pid

        def runs(self):
            """(the parent runs, the trials' runs): a refit's run is neither (`refits`)."""
            _, runs = runs_of(mlflow_uri, experiment)
            parents = [r for r in runs if r.data.tags.get("lenet_sweep.role") == "sweep"]
            children = [r for r in runs if "optuna.trial_number" in r.data.tags]
            return parents, children

        def refits(self):
            _, runs = runs_of(mlflow_uri, experiment)
            return [r for r in runs if r.data.tags.get("lenet_sweep.role") == "refit"]

    return Sweep()


@pytest.fixture
def postgres_url():
    import shutil
    import tempfile
    from pathlib import Path

    from tests.postgres import PostgresServer

    # Not under pytest's tmp dir: that one is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="lenet-pg-"))
    server = PostgresServer(root)
    try:
        yield server.start(password="s3cret-pw")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node Ray cluster started as docs/distributed.md tells users to: token
    authentication on, with a token made for it (here in the test's own folder, not the home
    directory). Yields its address and the environment a driver needs to reach it."""
    ray = shutil.which("ray")
    if ray is None:
        pytest.fail("ray is not installed: pip install -e '.[ray]'")
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray-")
    start = [ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp}"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, env={**os.environ, **env})
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        stop_processes_of(str(token))  # this cluster's only: `ray stop` ends every Ray here
        shutil.rmtree(temp, ignore_errors=True)


def train_refilled(members, data, spec, next_member=None, on_leave=None, occupancy=None):
    """The fused trainer (GroupTrainer) driven at the engine's level as lenet_sweep.job.scheduler
    drives it: at each boundary the epoch is collected, the leavers handed to `on_leave(member)`,
    then each freed slot asks `next_member(slot)` (None: the tail) and the newcomers are written
    (on CUDA at the next boundary: the next epoch launched before the hooks). Returns the
    Occupancy."""
    from lenet_sweep.fused.trainer import GroupTrainer

    trainer, pending = GroupTrainer(members, data, spec, occupancy), {}
    leave = on_leave or (lambda member: None)
    for member in trainer.left_at_start:
        leave(member)

    def write() -> None:
        for slot, member in list(pending.items()):
            del pending[slot]
            if not trainer.write(slot, member):
                leave(member)

    if trainer.group is not None:
        trainer.launch()
    while trainer.in_flight:
        ended = trainer.collect()
        if trainer.overlaps:
            write()
            trainer.launch()
        for member in trainer.run_hooks(ended):
            leave(member)
        for slot in trainer.free_slots():
            if next_member is None or trainer.tail or slot in pending:
                continue
            if (new := next_member(slot)) is None:
                trainer.tail = True
            else:
                pending[slot] = new
        if not trainer.overlaps:
            write()
            trainer.launch()
    trainer.close()
    return trainer.occupancy


def check_told_before_asked(sweep, *extra: str) -> None:
    """A fused sweep of 2 slots, 6 trials: trial j (j >= 2) is asked only once j - 1 trials are
    told (complete in the study): the sampler has seen every result before the next ask."""
    two_slots = ["hydra/launcher=fused", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=6"]
    proc = sweep.run(*two_slots, "lr=interval(0.1, 1.0)", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    for t in trials[2:]:
        told = [u for u in trials if u.datetime_complete <= t.datetime_start]
        assert len(told) >= t.number - 1, (t.number, [u.number for u in told])
