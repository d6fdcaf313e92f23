"""A sweep dir belongs to one study, and a killed sweep's parent run is ended by the next start:
each on real stores (issue 35, findings 5 and 6)."""

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
