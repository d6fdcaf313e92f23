"""Fused workers (`hydra.launcher.devices`): one process a device, all pulling trials from one
study, on the CPU as the tests run them (`devices=[cpu, cpu]`), read back from Optuna and MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml
from optuna.trial import TrialState

from lenet_sweep.sweep import protocol
from tests.conftest import run_cli

TWO_WORKERS = [
    "hydra/launcher=fused",
    "hydra.launcher.devices=[cpu,cpu]",
    "hydra.sweeper.n_jobs=4",  # each worker's group: 4 slots
    "lr=interval(0.1, 1.0)",
]


def _check_every_trial_once(sweep, n: int) -> set[int]:
    """n trials complete, one parent with n children; returns the workers' pids."""
    trials = sweep.trials()
    shown = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n, shown
    parents, children = sweep.runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == n
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert (sweep.dir / "optimization_results.yaml").is_file()  # the driver closed the sweep
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return {t.user_attrs[protocol.WORKER_PID] for t in complete}


@pytest.mark.parametrize(
    ("storage", "n"),
    [pytest.param(s, n, marks=pytest.mark.slow) for s, n in (("sqlite", 8), ("journal", 16))],
)
def test_two_workers_share_one_study(sweep, storage, n, tmp_path):
    if storage == "journal":  # Optuna's JournalStorage in a file: workers on one host
        sweep.storage = f"journal:///{tmp_path / 'journal' / 'study.log'}"
    proc = sweep.run(*TWO_WORKERS, f"hydra.sweeper.n_trials={n}", "epochs=range(1, 4)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = _check_every_trial_once(sweep, n)
    assert len(pids) == 2  # both workers trained trials
    out = proc.stdout
    assert out.count("worker on cpu started") == 2
    assert out.count("] study s in ") == 1 and out.count("mlflow ui ") == 1  # the driver's lines
    # The driver closes with its workers' slots, as a sweep on one device does.
    [parent], _ = sweep.runs()
    assert 0 < parent.data.metrics["slot_occupancy"] <= 1
    assert out.count("fused slots: ") == 1 and not (sweep.dir / ".workers").exists()


@pytest.mark.slow
def test_two_workers_on_postgresql_train_sixteen_trials(sweep, postgres_url):
    sweep.storage = postgres_url  # the study's storage for the sweep and for reading it back
    proc = sweep.run(*TWO_WORKERS, "hydra.sweeper.n_trials=16", "epochs=range(1, 4)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_check_every_trial_once(sweep, 16)) == 2


@pytest.mark.slow
def test_a_worker_killed_mid_group_loses_no_trial(sweep):
    args = sweep.args(*TWO_WORKERS, "hydra.sweeper.n_trials=16", "epochs=range(2, 5)")
    driver = subprocess.Popen(
        [sys.executable, "-m", "lenet_sweep", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Both workers training: trials of two pids, one of them has ended an epoch.
    sweep.wait_for(
        lambda trials: (
            len({t.user_attrs.get(protocol.WORKER_PID) for t in trials} - {None}) == 2
            and any(t.intermediate_values for t in trials)
        )
    )
    victim = next(
        t.user_attrs[protocol.WORKER_PID] for t in sweep.trials() if t.intermediate_values
    )
    os.kill(victim, signal.SIGKILL)
    assert driver.wait(timeout=900) == 0
    _check_every_trial_once(sweep, 16)
    trials = sweep.trials()
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert dead and all(t.user_attrs[protocol.WORKER_PID] == victim for t in dead)
    assert all(t.user_attrs["fail_reason"].startswith("worker died") for t in dead)
    _, children = sweep.runs()
    killed = {
        int(r.data.tags["optuna.trial_number"]) for r in children if r.info.status == "KILLED"
    }
    assert killed and killed <= {t.number for t in dead}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["submitit_local", "ray"])
def test_workers_through_an_engine_train_sixteen_trials(sweep, postgres_url, engine, request):
    """The same workers as submitit jobs (a job array of 2) and as tasks of a Ray cluster
    (`ray start --head`, 2 tasks), the study on PostgreSQL."""
    sweep.storage = postgres_url
    extra, env = [f"hydra.launcher.engine={engine}"], {}
    if engine == "ray":
        address, env = request.getfixturevalue("ray_cluster")
        extra.append(f"+hydra.launcher.ray.init.address={address}")
    proc = run_cli(
        *sweep.args(*TWO_WORKERS, *extra, "hydra.sweeper.n_trials=16", "epochs=range(1, 3)"),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_check_every_trial_once(sweep, 16)) == 2
    assert ("Ray tasks" if engine == "ray" else "workers as submitit_local jobs") in proc.stdout


def test_slurm_workers_ask_a_gpu_each_and_take_the_users_parameters():
    """No SLURM here (submitit's executor needs srun): what the job array is given, from the
    keys hydra/launcher=slurm takes."""
    from lenet_sweep.job.workers import resolve, submitit_parameters

    settings = {"partition": "gpu", "timeout_min": 120, "submitit_folder": "/shared/sub/%j"}
    devices = resolve(["cuda", "cuda", "cuda", "cuda"])
    assert submitit_parameters(devices, "slurm", settings) == {
        "gpus_per_node": 1,
        "slurm_partition": "gpu",
        "timeout_min": 120,
    }
    assert submitit_parameters(resolve(["cpu", "cpu"]), "submitit_local", {}) == {}
    with pytest.raises(Exception, match="is not cpu, cuda or cuda:N"):
        resolve(["tpu"])


def test_the_slurm_workers_command_composes(sweep):
    """docs/distributed.md's SLURM command, its launcher config as Hydra composes it."""
    proc = run_cli(
        *sweep.args(
            "hydra/launcher=fused",
            "hydra.launcher.devices=[cuda,cuda,cuda,cuda]",
            "hydra.launcher.engine=slurm",
            "hydra.launcher.submitit={partition: gpu, timeout_min: 120}",
        )[1:],  # without -m: --cfg shows what -m would run
        "--cfg",
        "hydra",
        "--package",
        "hydra.launcher",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = yaml.safe_load(proc.stdout)  # the node alone, under "# @package hydra.launcher"
    assert launcher["engine"] == "slurm" and launcher["devices"] == ["cuda"] * 4
    assert launcher["submitit"] == {"partition": "gpu", "timeout_min": 120}
