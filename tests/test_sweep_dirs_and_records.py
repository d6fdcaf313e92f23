"""A sweep dir belongs to one study, a killed sweep's parent run is ended by the next start, a
killed refit runs again: each on real stores (issue 35, findings 5 and 6; issue 34, part 2)."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from tests.conftest import SMALL, run_cli

pytestmark = pytest.mark.slow


def test_a_sweep_dir_belongs_to_one_study(sweep, tmp_path):
    first = sweep.run("hydra.sweeper.n_trials=2", "epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    held = sorted(p.name for p in sweep.dir.iterdir())
    sweep.study_name = "other"  # another study, the same hydra.sweep.dir
    other = sweep.run("hydra.sweeper.n_trials=2", "epochs=1")
    assert other.returncode == 2
    assert other.stderr.strip() == (
        f"error: hydra.sweep.dir={sweep.dir} holds the trials of study s; give study other a dir "
        "of its own (the default, outputs/multirun/<study_name>, is one)"
    )
    # The study's storage deleted, the same name again: its old trials' dirs are not reused.
    sweep.study_name, sweep.storage = "s", f"sqlite:///{tmp_path / 'new.db'}"
    again = sweep.run("hydra.sweeper.n_trials=2", "epochs=1")
    assert again.returncode == 2
    assert "no longer has; a new study there would overwrite them" in again.stderr
    assert sorted(p.name for p in sweep.dir.iterdir()) == held  # left as they were
    assert len(sweep.runs()[0]) == 1  # one parent run named sweep s


def test_a_killed_sweeps_parent_run_is_ended_by_the_next_start(sweep):
    one_done = lambda trials: any(t.state == TrialState.COMPLETE for t in trials)  # noqa: E731
    sweep.killed_when(one_done, "hydra.sweeper.n_trials=20", "epochs=range(1, 3)")
    [parent], _ = sweep.runs()
    assert parent.info.status == "RUNNING"
    store = [f"mlflow.tracking_uri={sweep.mlflow_uri}", f"mlflow.experiment={sweep.experiment}"]
    single = run_cli(*SMALL, *store, f"hydra.run.dir={sweep.dir.parent / 'single'}")
    assert single.returncode == 0, single.stderr[-2000:]
    [parent], _ = sweep.runs()
    assert parent.info.status == "KILLED"


def test_a_killed_refit_runs_again_and_once(sweep):
    """kill -9 during the refit: the rerun of the finished study refits (the killed refit's run
    ended KILLED), and a third run prints the kept answer."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = sweep.args("hydra.sweeper.n_trials=2", "epochs=3", "hydra.sweeper.refit_seeds=2")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen([sys.executable, "-m", "lenet_sweep", *args], **quiet)
    deadline = time.time() + 300
    while not any(r.info.status == "RUNNING" for r in sweep.refits()):
        assert time.time() < deadline and proc.poll() is None, "no refit began"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "answer: " in rerun.stdout
    assert sorted(r.info.status for r in sweep.refits()) == ["FINISHED", "KILLED"]
    again = run_cli(*args)
    assert "answer (kept from the study's refit)" in again.stdout and len(sweep.refits()) == 2
