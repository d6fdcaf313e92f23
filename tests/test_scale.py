"""Beyond one machine, on this one: a sweep against an MLflow tracking server (PostgreSQL backend,
artifacts served by the server), on submitit's local launcher, on a Ray cluster started with
`ray start`, and watched in optuna-dashboard. Every check reads the real server, storage or API."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lenet_sweep.sweep import protocol
from lenet_sweep.tracking import backend as tracking_backend
from tests.conftest import PRUNED_AND_COMPLETE, SMALL, model_of, run_cli, run_together
from tests.servers import free_port, get_json, serving

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-pw"  # postgres_url's
# Two trials pruned after epoch 1 (lr 1e-7 stays below 0.3), two complete: pruning reaches the
# jobs through the storage, whatever process they run in.
PRUNING = [
    *PRUNED_AND_COMPLETE,
    "seed=choice(1, 2)",
    "epochs=3",
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.n_jobs=2",
]


def _mlflow_server(backend: str, artifacts: Path, port: int):
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return serving(cmd, f"http://127.0.0.1:{port}/health")


def _children_and_parents(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(protocol.TAG_ROLE) == "sweep"]
    children = [r for r in runs if protocol.TAG_PARENT_RUN in r.data.tags]
    return parents, children


def _no_password_in(runs) -> bool:
    return not any(
        PASSWORD in str(v) for r in runs for v in [*r.data.params.values(), *r.data.tags.values()]
    )


# --- 1. an MLflow tracking server -----------------------------------------------------------------
@pytest.fixture
def tracking_server(tmp_path):
    """PostgreSQL with two databases (the study's, the tracking server's); yields the server's
    backend URL, the study's storage URL and the folder the server keeps artifacts in."""
    from tests.postgres import PostgresServer

    # Not under pytest's tmp dir: that one is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="lenet-pg-"))
    server = PostgresServer(root)
    try:
        storage = server.start(password=PASSWORD)
        yield server.create_database("mlflow"), storage, tmp_path / "artifacts"
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _server_sweep_args(experiment: str, storage: str, sweep_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        *SMALL,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=srv",
        f"hydra.sweep.dir={sweep_dir}",
        f"mlflow.experiment={experiment}",
        *extra,
    ]


def test_two_workers_record_through_a_tracking_server(tracking_server, tmp_path, experiment):
    from mlflow.tracking import MlflowClient

    backend, storage, artifacts = tracking_server
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with _mlflow_server(backend, artifacts, port):
        workers = [
            _server_sweep_args(
                experiment,
                storage,
                tmp_path / f"worker{i}",
                "hydra.sweeper.n_trials=4",
                "epochs=range(1, 3)",
            )
            for i in range(2)
        ]
        results = run_together(*workers, env={"MLFLOW_TRACKING_URI": uri})
        assert [code for code, _ in results] == [0, 0], "".join(o[-2000:] for _, o in results)
        assert all(PASSWORD not in out for _, out in results)
        trials = optuna.load_study(study_name="srv", storage=storage).get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]
        assert all(t.state == TrialState.COMPLETE for t in trials)

        client = MlflowClient(uri)  # everything below comes back through the server
        parents, children = _children_and_parents(client, experiment)
        assert len(parents) == 1 and len(children) == 4
        assert sorted(int(r.data.tags[protocol.TAG_TRIAL_NUMBER]) for r in children) == [0, 1, 2, 3]
        for run in children:
            trial = trials[int(run.data.tags[protocol.TAG_TRIAL_NUMBER])]
            history = client.get_metric_history(run.info.run_id, "val_acc")  # the objective
            assert [m.step for m in history] == list(range(1, trial.params["epochs"] + 1))
            assert history[-1].value == trial.value
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"config.yaml", "training_curves.png"} <= names
            assert "MLmodel" in model_of(client, run)[1]
            config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
            assert f"epochs: {trial.params['epochs']}" in config.read_text()
        plots = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
        assert "plots/optimization_history.png" in plots
        assert any(artifacts.rglob("training_curves.png"))  # stored by the server, not the workers
        assert _no_password_in([*parents, *children])


def test_a_tracking_server_stopped_mid_sweep(tracking_server, tmp_path, experiment):
    from mlflow.tracking import MlflowClient

    backend, storage, artifacts = tracking_server
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    args = _server_sweep_args(
        experiment,
        storage,
        tmp_path / "multirun",
        "hydra.sweeper.n_trials=3",
        "epochs=5",
        "lr=interval(0.1, 1.0)",
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    with _mlflow_server(backend, artifacts, port) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lenet_sweep", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(Exception):
                trials = optuna.load_study(study_name="srv", storage=storage).trials
                if trials and trials[0].intermediate_values:
                    break  # trial 0 is recording epochs through the server: stop the server
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 5, stderr[-3000:]  # an outage: not the trials' fault
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: trial 0 stopped, to run again: a store is unreachable")
    assert uri in last and "Traceback" not in stderr, stderr[-3000:]
    trials = optuna.load_study(study_name="srv", storage=storage).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL]  # stopped at the first one
    assert trials[0].user_attrs["rerun"] is True

    with _mlflow_server(backend, artifacts, port):  # the next start finishes the study
        rerun = subprocess.run(
            [sys.executable, "-m", "lenet_sweep", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert runs and all(r.info.status != "RUNNING" for r in runs)
        completed = optuna.load_study(study_name="srv", storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)
        )
        assert len(completed) == 3  # n_trials: the outage's trial did not count


# --- 2. and 3. submitit and Ray -------------------------------------------------------------------
# Each launcher's overrides and the environment its sweep needs.
LAUNCHERS = {
    "submitit_local": lambda _: (["hydra/launcher=submitit_local"], {}),
    "ray_cluster": lambda cluster: (
        ["hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={cluster[0]}"],
        cluster[1],
    ),
}


@pytest.fixture(params=list(LAUNCHERS))
def launcher(request):
    cluster = request.getfixturevalue("ray_cluster") if request.param == "ray_cluster" else None
    return LAUNCHERS[request.param](cluster)


def test_launcher_runs_trials_in_their_own_processes_and_prunes(sweep, launcher):
    overrides, env = launcher
    proc = run_cli(*sweep.args(*overrides, *PRUNING), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    states = sorted((t.params["lr"], t.params["seed"], t.state.name) for t in trials)
    assert states == [
        (1e-07, 1, "PRUNED"),
        (1e-07, 2, "PRUNED"),
        (0.003, 1, "COMPLETE"),
        (0.003, 2, "COMPLETE"),
    ]
    _, children = sweep.runs()
    assert len(children) == 4
    sweeper_pid = str(trials[0].user_attrs[protocol.WORKER_PID])
    job_pids = {r.data.tags[tracking_backend.TAG_PID] for r in children}
    assert sweeper_pid not in job_pids  # every job ran in a process of the launcher's
    client = tracking_backend.client(sweep.mlflow_uri)
    for run in children:
        trial = trials[int(run.data.tags[protocol.TAG_TRIAL_NUMBER])]
        history = client.get_metric_history(run.info.run_id, "val_acc")  # the objective
        assert {m.step: m.value for m in history} == trial.intermediate_values
        if trial.state == TrialState.COMPLETE:  # the value the sweeper got back is the job's
            assert history[-1].value == trial.value


def test_launcher_job_killed_fails_its_trial_and_a_new_one_runs(sweep, launcher):
    overrides, env = launcher
    args = sweep.args(
        *overrides,
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.n_trials=2",
        "epochs=4",
        "lr=interval(0.1, 1.0)",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "lenet_sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    client, killed = tracking_backend.client(sweep.mlflow_uri), None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline:
        time.sleep(0.2)
        _, children = sweep.runs()
        for run in children:
            if client.get_metric_history(run.info.run_id, "test_acc"):  # an epoch done: kill it
                killed = int(run.data.tags[protocol.TAG_TRIAL_NUMBER])
                os.kill(int(run.data.tags[tracking_backend.TAG_PID]), signal.SIGKILL)
                break
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    trials = sweep.trials()
    assert trials[killed].state == TrialState.FAIL
    lost = trials[killed].user_attrs  # lost, not the trial's fault: it runs again, uncounted
    assert lost[protocol.RERUN] is True and lost[protocol.FAIL_REASON].startswith(
        "job process died"
    )
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2 and len(trials) == 3
    _, children = sweep.runs()
    statuses = {int(r.data.tags[protocol.TAG_TRIAL_NUMBER]): r.info.status for r in children}
    assert statuses[killed] == "KILLED"
    assert sorted(s for n, s in statuses.items() if n != killed) == ["FINISHED", "FINISHED"]


# --- 4. optuna-dashboard --------------------------------------------------------------------------
def test_optuna_dashboard_reads_the_study(sweep):
    proc = sweep.run("hydra.sweeper.n_trials=3", "epochs=range(1, 3)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dashboard = shutil.which("optuna-dashboard")
    assert dashboard, "optuna-dashboard is not installed: pip install -e '.[dashboard]'"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(
        [dashboard, sweep.storage, "--host", "127.0.0.1", "--port", str(port)], f"{base}/api/meta"
    ):
        studies = get_json(f"{base}/api/studies")["study_summaries"]
        [study] = [s for s in studies if s["study_name"] == sweep.study_name]
        detail = get_json(f"{base}/api/studies/{study['study_id']}")
    trials = sweep.trials()
    shown = {t["number"]: t for t in detail["trials"]}
    assert sorted(shown) == [t.number for t in trials]
    for trial in trials:
        assert shown[trial.number]["state"] == "Complete"
        assert shown[trial.number]["values"] == [trial.value]
        steps = {v["step"]: v["value"] for v in shown[trial.number]["intermediate_values"]}
        assert steps == trial.intermediate_values  # the per-epoch test accuracy
        attrs = {a["key"]: a["value"] for a in shown[trial.number]["user_attrs"]}
        assert attrs[protocol.MLFLOW_RUN_ID] == trial.user_attrs[protocol.MLFLOW_RUN_ID]


def test_the_slurm_config_composes_into_submitits_slurm_launcher():
    """No SLURM here: the shipped config must at least compose and build its launcher."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lenet_sweep import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    node = cfg.hydra.launcher
    assert node._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (node.partition, node.gpus_per_node, node.timeout_min) == ("gpu", 1, 60)
    launcher = instantiate(node)
    assert type(launcher).__name__ == "SlurmLauncher" and launcher.params["partition"] == "gpu"
