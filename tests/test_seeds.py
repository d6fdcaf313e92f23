"""`seeds=N`: a run, or each trial of a sweep, trains N seeds side by side, its metrics (and a
trial's objective) their mean, read back from the log, Optuna and MLflow; in a sweep fused (the
seeds as members of the launcher's group) and basic (a group of the job's own)."""

from __future__ import annotations

import re
import statistics

import pytest
from optuna.trial import TrialState

from lenet_sweep.tracking import backend as tracking_backend
from tests.conftest import SMALL, run_cli, runs_of

REPEATED = [
    "seeds=3",
    "hydra/sweeper/sampler=grid",
    "lr=choice(0.3, 0.9)",
    "hydra.sweeper.n_trials=4",
]


def _seeds_of(run, metric: str = "test_acc") -> dict[int, float]:
    got = {}
    for key, value in run.data.metrics.items():
        if m := re.fullmatch(rf"seed_(\d+)\.{metric}", key):
            got[int(m[1])] = value
    return got


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["fused", "basic"])
def test_a_repeated_trial_is_the_mean_of_its_seeds(sweep, launcher):
    extra = ["hydra/launcher=fused", "hydra.sweeper.n_jobs=4"] if launcher == "fused" else []
    proc = sweep.run(*REPEATED, "epochs=choice(1, 2)", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    _, children = sweep.runs()
    assert len(children) == 4  # one run a trial, its seeds inside
    client = tracking_backend.client(sweep.mlflow_uri)
    for run in children:
        t = trials[int(run.data.tags["optuna.trial_number"])]
        seeds = _seeds_of(run, "val_acc")  # the objective
        assert sorted(seeds) == [42, 43, 44]  # the trial's seed and the next two
        assert t.value == pytest.approx(statistics.fmean(seeds.values()))
        assert run.data.metrics["val_acc"] == pytest.approx(t.value)
        assert run.data.metrics["val_acc_std"] == pytest.approx(statistics.pstdev(seeds.values()))
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, t.params["epochs"] + 1))
        # Pruning sees the mean: the trial's epoch values are the run's (mean) curve.
        assert t.intermediate_values == {m.step: m.value for m in history}
    # Each seed trains as its run alone: seed 44 of the last trial against a run with seed=44.
    last = trials[-1]
    (run,) = [r for r in children if r.data.tags["optuna.trial_number"] == str(last.number)]
    alone = run_cli(
        *[o for o in SMALL if not o.startswith("epochs=")],
        f"lr={last.params['lr']}",
        f"epochs={last.params['epochs']}",
        "seed=44",
        "data.val_size=170",  # the trials' validation split: the same training images
        f"hydra.run.dir={sweep.dir.parent / 'alone'}",
        f"mlflow.tracking_uri=sqlite:///{sweep.dir.parent / 'alone.db'}",
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    test_acc = float(re.search(r"test acc (\d\.\d+)", alone.stdout).group(1))
    assert abs(_seeds_of(run)[44] - test_acc) <= 0.02
    out = proc.stdout
    for seed in (42, 43, 44):  # each seed's epochs in the log
        assert f" seed {seed}: epoch 1/" in out


def test_a_single_run_of_three_seeds(tmp_path, mlflow_uri, experiment):
    """`python -m lenet_sweep seeds=3`: each seed's closing line and their mean ± std, one MLflow
    run with the mean's curves and their standard deviations, each seed's finals."""
    store = [f"mlflow.tracking_uri={mlflow_uri}", f"mlflow.experiment={experiment}"]
    proc = run_cli(*SMALL, "seeds=3", *store, f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    pattern = re.compile(r"seed (\d+): loss .*, test acc (\d\.\d+)")
    found = {int(m[1]): float(m[2]) for m in map(pattern.fullmatch, lines) if m}
    assert sorted(found) == [42, 43, 44]
    mean = re.search(r"mean of 3 seeds: loss .* test acc (\d\.\d+) ± (\d\.\d+)", proc.stdout)
    assert mean and float(mean[1]) == pytest.approx(statistics.fmean(found.values()), abs=1e-3)
    assert float(mean[2]) == pytest.approx(statistics.pstdev(found.values()), abs=1e-3)
    client, runs = runs_of(mlflow_uri, experiment)
    [run] = runs
    assert run.data.params["seeds"] == "3" and run.info.status == "FINISHED"
    assert sorted(_seeds_of(run)) == [42, 43, 44]
    for key in ("test_acc", "test_acc_std", "train_loss_std"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()  # a run of seeds keeps none


def test_seeds_are_at_least_one_and_repeats_is_gone(sweep):
    proc = sweep.run("seeds=0")
    assert proc.returncode == 2
    assert "seeds=0: must be an integer >= 1" in proc.stderr
    proc = sweep.run("hydra.sweeper.repeats=3")
    assert proc.returncode == 2
    assert "hydra.sweeper.repeats=3: gone; seeds=3 is the run knob now" in proc.stderr


@pytest.mark.slow
def test_a_killed_repeated_trial_runs_all_its_seeds_again(sweep):
    fused = ["hydra/launcher=fused", "hydra.sweeper.n_jobs=4", "epochs=choice(3, 4)"]
    sweep.killed_when(lambda trials: any(t.intermediate_values for t in trials), *REPEATED, *fused)
    stale = [t.number for t in sweep.trials() if t.state == TrialState.RUNNING]
    assert stale
    rerun = sweep.run(*REPEATED, *fused)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = sweep.trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert all(trials[n].state == TrialState.FAIL for n in stale)
    _, children = sweep.runs()
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        if number in stale:
            assert run.info.status == "KILLED"
        else:  # every seed of a trial run again from its start
            assert run.info.status == "FINISHED" and sorted(_seeds_of(run)) == [42, 43, 44]
            assert run.data.metrics["epochs_run"] == trials[number].params["epochs"]


def test_a_diverging_seed_is_named(tmp_path, mlflow_uri, experiment):
    store = [f"mlflow.tracking_uri={mlflow_uri}", f"mlflow.experiment={experiment}"]
    proc = run_cli(*SMALL, "seeds=2", "lr=50", *store, f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.search(r"^error: seed 4[23]: training diverged at epoch 1: ", proc.stderr, re.M)
    _, [run] = runs_of(mlflow_uri, experiment)
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
