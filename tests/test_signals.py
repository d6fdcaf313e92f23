"""Interruptions: SIGTERM and kill -9 on real subprocesses, stores read back afterwards."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lenet_sweep.tracking import backend as tracking_backend
from tests.conftest import SMALL, run_cli, runs_of

ARGS = [*SMALL, "epochs=5", "data.train_size=3000"]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lenet_sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_epoch(checkpoint: Path, epoch: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if torch.load(checkpoint, weights_only=True)["epoch"] >= epoch:
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.1)
    raise AssertionError("no checkpoint in time")


def _common(mlflow_uri, experiment, run_dir):
    return [
        *ARGS,
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={experiment}",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_sigterm_ends_killed_and_resume_equals_uninterrupted_run(tmp_path, mlflow_uri, experiment):
    first = tmp_path / "first"
    proc = _start(*_common(mlflow_uri, experiment, first))
    _wait_for_epoch(first / "checkpoint.pt", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted (signal SIGTERM)" in out and "Traceback" not in out
    client, runs = runs_of(mlflow_uri, experiment)
    assert [r.info.status for r in runs] == ["KILLED"]
    run_id = runs[0].info.run_id
    stopped_at = torch.load(first / "checkpoint.pt", weights_only=True)["epoch"]
    assert 2 <= stopped_at < 5

    resumed = run_cli(*_common(mlflow_uri, experiment, tmp_path / "second"), f"resume={first}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client, runs = runs_of(mlflow_uri, experiment)
    assert len(runs) == 1 and runs[0].info.run_id == run_id  # the same MLflow run, continued
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["hydra.output_dir"] == str(first)  # where the first epochs are
    assert runs[0].data.tags["lenet_sweep.resumed_in"] == str(tmp_path / "second")
    history = client.get_metric_history(run_id, "test_acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]

    straight = run_cli(*_common(mlflow_uri, experiment + "-straight", tmp_path / "straight"))
    assert straight.returncode == 0
    _, [reference] = runs_of(mlflow_uri, experiment + "-straight")
    for key in ("train_loss", "train_acc", "test_acc"):
        assert runs[0].data.metrics[key] == reference.data.metrics[key]  # bit-identical on CPU
    assert resumed.stdout.splitlines()[-2] == straight.stdout.splitlines()[-2]


@pytest.mark.slow
def test_resume_refuses_another_config(tmp_path, mlflow_uri, experiment):
    done = run_cli(*_common(mlflow_uri, experiment, tmp_path / "a"), "epochs=1")
    assert done.returncode == 0
    proc = run_cli(
        *_common(mlflow_uri, experiment, tmp_path / "b"), f"resume={tmp_path / 'a'}", "lr=0.5"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(
        f"error: resume: {tmp_path / 'a' / 'checkpoint.pt'} was made with another"
    )


def test_checkpoints_load_weights_only(tmp_path, mlflow_uri, experiment):
    assert run_cli(*_common(mlflow_uri, experiment, tmp_path), "epochs=1").returncode == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {
        "model",
        "optimizer",
        "shuffle_rng",
        "torch_rng",
        "history",
    }


@pytest.mark.slow
def test_kill_9_leaves_state_the_next_start_repairs(tmp_path, mlflow_uri, experiment):
    proc = _start(*_common(mlflow_uri, experiment, tmp_path / "a"))
    _wait_for_epoch(tmp_path / "a" / "checkpoint.pt", 1, proc)
    proc.kill()
    proc.wait()
    _, runs = runs_of(mlflow_uri, experiment)
    assert [r.info.status for r in runs] == ["RUNNING"]  # nothing could mark it
    nxt = run_cli(*_common(mlflow_uri, experiment, tmp_path / "b"), "epochs=1")
    assert nxt.returncode == 0
    client, runs = runs_of(mlflow_uri, experiment)
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert sorted(statuses.values()) == ["FINISHED", "KILLED"]


def test_diverging_run_stops_failed_with_tag(tmp_path, mlflow_uri, experiment):
    proc = run_cli(*_common(mlflow_uri, experiment, tmp_path), "lr=50")
    assert proc.returncode == 3  # diverged: not bad input (2)
    assert proc.stderr.strip().startswith("error: training diverged at epoch 1: train loss")
    _, [run] = runs_of(mlflow_uri, experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged"] == "true" and run.data.tags["diverged_at_epoch"] == "1"


@pytest.fixture
def sweep_args(tmp_path, mlflow_uri, experiment):
    tracking_backend.prepare_experiment(mlflow_uri, experiment)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def _args(*extra):
        return [
            "-m",
            *ARGS,
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=s",
            f"hydra.sweep.dir={tmp_path / 'm'}",
            f"mlflow.tracking_uri={mlflow_uri}",
            f"mlflow.experiment={experiment}",
            *extra,
        ]

    _args.study = lambda: optuna.load_study(study_name="s", storage=storage)
    return _args


@pytest.mark.slow
def test_diverging_trial_fails_and_sweep_continues(sweep_args, mlflow_uri, experiment):
    proc = run_cli(*sweep_args("hydra/sweeper/sampler=grid", "lr=choice(0.5, 50)", "epochs=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = {t.params["lr"]: t.state for t in sweep_args.study().trials}
    assert states == {0.5: TrialState.COMPLETE, 50: TrialState.FAIL}
    failed = [t for t in sweep_args.study().trials if t.state == TrialState.FAIL][0]
    assert "training diverged at epoch 1" in failed.user_attrs["fail_reason"]
    _, runs = runs_of(mlflow_uri, experiment)
    diverged = [r for r in runs if r.data.tags.get("diverged") == "true"]
    assert len(diverged) == 1 and diverged[0].info.status == "FAILED"


@pytest.mark.slow
def test_sigterm_during_sweep_marks_everything(sweep_args, mlflow_uri, experiment, tmp_path):
    proc = _start(*sweep_args("hydra.sweeper.n_trials=3", "lr=interval(0.1, 1.0)"))
    _wait_for_epoch(tmp_path / "m" / "0" / "checkpoint.pt", 1, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    trials = sweep_args.study().trials
    assert [t.state for t in trials] == [TrialState.FAIL]
    _, runs = runs_of(mlflow_uri, experiment)
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]  # parent and child
    assert (tmp_path / "m" / "0" / "checkpoint.pt").exists()
    # and the next start finishes the sweep: the interrupted trial does not count
    again = run_cli(*sweep_args("hydra.sweeper.n_trials=3", "lr=interval(0.1, 1.0)"))
    assert again.returncode == 0, again.stderr[-2000:]
    states = [t.state for t in sweep_args.study().trials]
    assert states.count(TrialState.COMPLETE) == 3 and len(states) == 4
