"""Nothing a run or a sweep does writes into the directory it is started from but outputs/: a
run, a sweep and a sweep of fused workers as submitit jobs (whose folder defaults under the
sweep dir), each started from an empty directory."""

from __future__ import annotations

import pytest

from tests.conftest import SMALL, run_cli

pytestmark = pytest.mark.slow


def test_runs_and_sweeps_leave_the_current_directory_alone(tmp_path, sweep):
    here = tmp_path / "here"
    here.mkdir()
    store = f"mlflow.tracking_uri={sweep.mlflow_uri}"
    single = run_cli(*SMALL, store, f"hydra.run.dir={tmp_path / 'run'}", cwd=here)
    assert single.returncode == 0, single.stderr[-2000:]
    plain = run_cli(*sweep.args("hydra.sweeper.n_trials=2", "epochs=1"), cwd=here)
    assert plain.returncode == 0, plain.stderr[-2000:]
    sweep.study_name, sweep.dir = "workers", tmp_path / "workers"  # a sweep dir a study
    workers = ["hydra/launcher=fused", "hydra.launcher.devices=[cpu,cpu]", "epochs=1"]
    workers += ["hydra.launcher.engine=submitit_local", "hydra.sweeper.n_trials=4"]
    on_submitit = run_cli(*sweep.args(*workers), cwd=here)
    assert on_submitit.returncode == 0, on_submitit.stderr[-3000:]
    assert sorted(p.name for p in here.iterdir()) in ([], ["outputs"])
    assert list((sweep.dir / ".submitit").iterdir())  # the workers' jobs' folder, in the sweep dir
