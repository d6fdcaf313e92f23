"""Trials in flight on the process launchers: the moment one ends, the next starts (no batch
barrier), read back from the runs' and trials' times; `hydra.sweeper.batches=true` keeps Hydra's."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

# Trial 0 trains 1 epoch, trial 1 forty: the third trial starts when trial 0 ends, long before
# trial 1 does; in batches, after both.
SHORT_LONG_SHORT = [
    "hydra.sweeper.n_jobs=2",
    "hydra.sweeper.n_trials=3",
    "epochs=choice(1, 40)",
    "hydra.sweeper.enqueue=[{lr: 0.5, epochs: 1}, {lr: 0.5, epochs: 40}, {lr: 0.6, epochs: 1}]",
]


def _times(sweep):
    """(start, end) in ms of each trial's MLflow run, by trial number."""
    _, children = sweep.runs()
    return {
        int(r.data.tags["optuna.trial_number"]): (r.info.start_time, r.info.end_time)
        for r in children
    }


@pytest.mark.parametrize(
    ("launcher", "batches"),
    [
        pytest.param("joblib", False, marks=pytest.mark.slow),
        pytest.param("joblib", True, marks=pytest.mark.slow),
        pytest.param("submitit_local", False, marks=pytest.mark.slow),
        pytest.param("ray", False, marks=pytest.mark.slow),
    ],
)
def test_a_freed_job_slot_takes_the_next_trial_at_once(sweep, launcher, batches):
    extra = {
        "joblib": ["hydra.launcher.n_jobs=2"],
        "ray": ["++hydra.launcher.ray.init.num_cpus=2"],
    }.get(launcher, [])
    proc = sweep.run(
        f"hydra/launcher={launcher}",
        *extra,
        *SHORT_LONG_SHORT,
        f"hydra.sweeper.batches={str(batches).lower()}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.params["epochs"] for t in trials] == [1, 40, 1]
    runs = _times(sweep)
    assert sorted(runs) == [0, 1, 2]
    assert runs[2][0] > runs[0][1]  # the third trial started after the short one ended
    if batches:  # Hydra's: after the whole batch
        assert runs[2][0] > runs[1][1]
        assert trials[2].datetime_start > trials[1].datetime_complete
    else:  # and while the long one still trained
        assert runs[2][0] < runs[1][1]
        assert trials[2].datetime_start < trials[1].datetime_complete
    # Job numbers stay trial numbers: each trial's job dir is its number.
    assert all((sweep.dir / str(t.number) / ".hydra" / "config.yaml").is_file() for t in trials)
