"""Outages are not the trial's fault (issue 26, faults 2 and 3): a tracking server killed mid-sweep
and a full disk stop the run or sweep with one line and exit 5, count no trial, leave no temporary
file, and the same command afterwards finishes the study's n_trials."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import SMALL, run_cli, runs_of
from tests.servers import free_port, serving

pytestmark = pytest.mark.slow


def _server(backend: str, artifacts, port: int):
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    return serving(cmd, f"http://127.0.0.1:{port}/health")


def test_a_tracking_server_outage_stops_the_sweep_and_the_rerun_finishes_it(tmp_path):
    port, storage = free_port(), f"sqlite:///{tmp_path}/optuna.db"
    uri = f"http://127.0.0.1:{port}"
    backend, artifacts = f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts"
    args = ["-m", *SMALL, "hydra.sweeper.n_trials=6", "hydra.sweeper.params.epochs=1",
            f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path}/multirun",
            f"mlflow.tracking_uri={uri}", "mlflow.experiment=outage"]  # fmt: skip

    def trials():
        with contextlib.suppress(Exception):
            return optuna.load_study(study_name="lenet_sweep", storage=storage).get_trials()
        return []

    with _server(backend, artifacts, port) as server:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "lenet_sweep", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 300
        while not any(t.state == TrialState.COMPLETE for t in trials()) and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        _, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 5, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "to run again" in line and "unreachable" in line and f"127.0.0.1:{port}" in line
    assert "rerun the same command" in line and "Traceback" not in err
    states = [t.state for t in trials()]
    assert states.count(TrialState.COMPLETE) >= 1 and states.count(TrialState.FAIL) == 1
    [hit] = [t for t in trials() if t.state == TrialState.FAIL]
    assert hit.user_attrs["rerun"] is True and "unreachable" in hit.user_attrs["fail_reason"]
    assert TrialState.RUNNING not in states  # the sweep stopped at the first outage

    with _server(backend, artifacts, port):
        rerun = subprocess.run(
            [sys.executable, "-m", "lenet_sweep", *args], capture_output=True, text=True
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        done = [t for t in trials() if t.state == TrialState.COMPLETE]
        assert len(done) == 6  # the study's n_trials, the outage's trial not among them
        client, runs = runs_of(uri, "outage")
        parents = [r for r in runs if r.data.tags.get("lenet_sweep.role") == "sweep"]
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert "RUNNING" not in {r.info.status for r in runs}


@pytest.fixture
def disk(tmp_path):
    """A 30 MB tmpfs for the run dir and both stores."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk) -> None:
    with open(disk / "filler", "ab", buffering=0) as f:
        for size in (2**20, 2**12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def _left_over(disk) -> list[str]:
    return [str(p) for p in disk.rglob("*") if p.suffix in (".tmp",) or "-journal" in p.name]


def test_a_full_disk_stops_a_run_with_one_line_and_resume_goes_on(disk):
    stores = [f"mlflow.tracking_uri=sqlite:///{disk}/mlflow.db", "mlflow.experiment=disk"]
    run = [*SMALL, *stores, f"hydra.run.dir={disk}/run"]
    assert run_cli(*SMALL, *stores, f"hydra.run.dir={disk}/first").returncode == 0  # the store
    _fill(disk)
    before = run_cli(*run)  # full before the start
    assert before.returncode == 5, before.stderr[-3000:]
    [line] = before.stderr.strip().splitlines()
    assert (
        line.startswith(f"error: the filesystem at {disk} (holding {disk}/")
        and " is full (" in line
    )
    assert not (disk / "run").exists() and _left_over(disk) == []

    (disk / "filler").unlink()
    longer = [*run[1:], "data.train_size=12000", "epochs=4"]  # SMALL's train size replaced
    proc = subprocess.Popen([sys.executable, "-m", "lenet_sweep", *longer],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not (disk / "run" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    _fill(disk)  # full mid-run, after the first epoch's checkpoint
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 5, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"the filesystem at {disk} (holding " in line and "Traceback" not in err
    assert _left_over(disk) == []

    (disk / "filler").unlink()
    resumed = run_cli(*longer, f"resume={disk}/run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, runs = runs_of(f"sqlite:///{disk}/mlflow.db", "disk")
    assert "RUNNING" not in {r.info.status for r in runs}
    assert max(r.data.metrics.get("epochs_run", 0) for r in runs) == 4


def test_a_full_disk_stops_a_sweep_and_the_rerun_finishes_it(disk):
    storage = f"sqlite:///{disk}/optuna.db"
    args = ["-m", *SMALL, "hydra.sweeper.n_trials=3", "hydra.sweeper.params.epochs=1",
            f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={disk}/multirun",
            f"mlflow.tracking_uri=sqlite:///{disk}/mlflow.db", "mlflow.experiment=disk"]  # fmt: skip

    def states():
        with contextlib.suppress(Exception):
            study = optuna.load_study(study_name="lenet_sweep", storage=storage)
            return [t.state for t in study.get_trials()]
        return []

    proc = subprocess.Popen([sys.executable, "-m", "lenet_sweep", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while TrialState.COMPLETE not in states() and time.time() < deadline:
        time.sleep(0.05)
    _fill(disk)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 5, err[-3000:]
    assert "Traceback" not in err and " is full (" in err.strip().splitlines()[-1]
    again = run_cli(*args)  # still full: the sweep does not start
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 5 and last.startswith(f"error: the filesystem at {disk} (holding ")
    (disk / "filler").unlink()
    assert run_cli(*args).returncode == 0
    assert states().count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states()
    _, runs = runs_of(f"sqlite:///{disk}/mlflow.db", "disk")
    assert "RUNNING" not in {r.info.status for r in runs} and _left_over(disk) == []
