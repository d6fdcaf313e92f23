"""Refill: a fused group's freed slot takes the next trial at the next epoch boundary, in the
engine and through `hydra/launcher=fused` end to end, read back from Optuna and MLflow."""

from __future__ import annotations

import math
import re

import pytest
import torch
from optuna.trial import TrialState

from lenet_sweep.core.data import Splits, load_split
from lenet_sweep.core.state import StepSpec, TrainSpec
from lenet_sweep.core.train import train
from lenet_sweep.fused.trainer import Member, Occupancy
from lenet_sweep.job.job import build_model as build
from lenet_sweep.tracking import backend as tracking_backend
from tests.conftest import SMALL, check_told_before_asked, run_cli, train_refilled

CPU = torch.device("cpu")
EPOCHS = [1, 4, 2, 3, 1, 2, 4, 1, 3, 2, 1, 2]  # twelve trials, each its own length
# Twelve trials of four lengths, three lrs, as a grid: each asked once, in the grid's order.
REFILL = [
    "hydra/launcher=fused",
    "hydra.sweeper.n_jobs=4",
    "hydra.sweeper.n_trials=12",
    "hydra/sweeper/sampler=grid",
    "lr=choice(0.1, 0.3, 0.9)",
    "epochs=choice(1, 2, 3, 4)",
]


@pytest.fixture
def make(make_cfg):
    splits = load_split(make_cfg().data, True, CPU), load_split(make_cfg().data, False, CPU)

    def _make(lr: float, seed: int, *overrides: str):
        return build(make_cfg(f"lr={lr}", f"seed={seed}", *overrides), CPU)

    return _make, splits


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_each_freed_slot_takes_the_next_trial_at_the_next_boundary(make, optimizer):
    make, splits = make
    base = 0.9 if optimizer == "sgd" else 0.003
    specs = [(base / (1 + i % 3), i, epochs) for i, epochs in enumerate(EPOCHS)]
    queue = [Member(*make(lr, seed, f"optimizer={optimizer}"), e, seed) for lr, seed, e in specs]
    members, occupancy = list(queue), Occupancy()
    slot_of = {id(m): k for k, m in enumerate(members[:4])}
    left, joined = [], []  # (group epoch, slot) of each departure and each refill

    def refill(slot: int):
        joined.append((occupancy.slot_epochs // 4, slot))
        if not queue:
            return None
        slot_of[id(queue[0])] = slot
        return queue.pop(0)

    def on_leave(member):
        left.append((occupancy.slot_epochs // 4, slot_of[id(member)]))

    first, queue[:] = queue[:4], queue[4:]
    spec = StepSpec(batch_size=256, graph=False)
    train_refilled(first, Splits(*splits), spec, refill, on_leave, occupancy)
    assert [len(m.result.history) for m in members] == EPOCHS
    # Each of the first eight departures (the study still had trials) refilled its own slot at
    # the same boundary; the ninth found the queue empty: the tail began.
    assert joined[:8] == left[:8] and len(joined) == 9
    assert occupancy.live_epochs == sum(EPOCHS)
    before_tail = occupancy.slot_epochs - occupancy.tail_slots
    assert occupancy.live_epochs - occupancy.tail_live == before_tail  # no slot idle till then
    # A refilled member trains as its run alone: its own init, optimizer state, lr and shuffle.
    for (lr, seed, epochs), member in list(zip(specs, members, strict=True))[4:8]:
        net, opt = make(lr, seed, f"optimizer={optimizer}")
        solo = train(
            net,
            opt,
            Splits(*splits),
            TrainSpec(epochs=epochs, batch_size=256, seed=seed, progress=False),
        )
        fused = member.result.history
        assert math.isclose(fused[0]["train_loss"], solo.history[0]["train_loss"], rel_tol=1e-4)
        assert abs(fused[-1]["test_acc"] - solo.final["test_acc"]) <= 0.02


def _children_by_trial(sweep):
    _, children = sweep.runs()
    return {int(r.data.tags["optuna.trial_number"]): r for r in children}


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["none", "hyperband"])
def test_a_fused_sweep_refills_every_freed_slot(sweep, pruner):
    proc = sweep.run(*REFILL, f"hydra/sweeper/pruner={pruner}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert len(trials) == 12
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    if pruner == "hyperband":  # a pruned member's slot is refilled as one that ended
        assert any(t.state == TrialState.PRUNED for t in trials)
    parents, _ = sweep.runs()
    runs = _children_by_trial(sweep)
    assert len(parents) == 1 and sorted(runs) == list(range(12))
    groups = {r.data.tags["lenet_sweep.fused_group"].split()[0] for r in runs.values()}
    assert len(groups) == 1  # one group of four slots took all twelve
    assert {r.data.tags["lenet_sweep.fused_group"].split("(")[1] for r in runs.values()} == {
        f"slot {k} of 4)" for k in range(1, 5)
    }
    client = tracking_backend.client(sweep.mlflow_uri)
    for t in trials:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == t.state.name
        history = client.get_metric_history(run.info.run_id, "val_acc")  # the objective
        if t.state == TrialState.COMPLETE:
            assert len(history) == t.params["epochs"] and history[-1].value == t.value
    metrics = parents[0].data.metrics
    assert metrics["slot_occupancy_asking"] >= 0.95
    assert metrics["slot_occupancy"] < 1  # the tail: the last trials end one by one
    if pruner == "none":  # the last trial asked, run alone: the numbers it had in its slot
        last = trials[-1]
        alone = run_cli(
            *[o for o in SMALL if not o.startswith("epochs=")],
            f"lr={last.params['lr']}",
            f"epochs={last.params['epochs']}",
            "data.val_size=170",  # the trials' validation split: the same training images
            f"hydra.run.dir={sweep.dir.parent / 'alone'}",
            f"mlflow.tracking_uri=sqlite:///{sweep.dir.parent / 'alone.db'}",
        )
        assert alone.returncode == 0, alone.stderr[-2000:]
        test_acc = float(re.search(r"test acc (\d\.\d+)", alone.stdout).group(1))
        assert abs(runs[last.number].data.metrics["test_acc"] - test_acc) <= 0.02


@pytest.mark.slow
def test_a_refilling_sweep_killed_then_rerun_finishes_the_total(sweep):
    # Refilled slots training: more trials asked than the group has slots, two of them done.
    sweep.killed_when(
        lambda trials: len(trials) > 5 and sum(t.state == TrialState.COMPLETE for t in trials) >= 2,
        *REFILL,
    )
    stale = [t.number for t in sweep.trials() if t.state == TrialState.RUNNING]
    assert stale
    rerun = sweep.run(*REFILL)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = sweep.trials()
    counted = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(counted) == 12
    assert all(trials[n].state == TrialState.FAIL for n in stale)
    assert all(trials[n].user_attrs["fail_reason"].startswith("worker died") for n in stale)
    runs = _children_by_trial(sweep)
    # A stale trial killed while its job was being prepared may have no run yet; those that had
    # one end KILLED, every other FINISHED: none is left RUNNING.
    killed = {n for n, r in runs.items() if r.info.status == "KILLED"}
    assert killed and killed <= set(stale) and {m for m in stale if m in runs} == killed
    assert all(r.info.status == "FINISHED" for n, r in runs.items() if n not in stale)


@pytest.mark.slow
def test_trials_of_another_group_or_that_fail_to_prepare_take_no_slot(sweep):
    """SGD and Adam trials cannot share a group: each waits for a group of its own key. A trial
    whose config is refused fails as it is asked, and its slot goes to the next one."""
    proc = sweep.run(
        "hydra/launcher=fused",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra/sweeper/sampler=grid",
        "optimizer=choice(sgd, adam)",
        "batch_size=choice(256, 99999)",
        "epochs=choice(1, 2)",
        "lr=0.01",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert len(trials) == 8
    for t in trials:
        if t.params["batch_size"] == 99999:
            assert t.state == TrialState.FAIL and "batch_size" in t.user_attrs["fail_reason"]
        else:
            assert t.state == TrialState.COMPLETE
    runs = _children_by_trial(sweep)
    assert sorted(runs) == sorted(t.number for t in trials if t.state == TrialState.COMPLETE)
    group_of = {n: r.data.tags["lenet_sweep.fused_group"].split()[0] for n, r in runs.items()}
    by_optimizer = {}
    for n, group in group_of.items():
        by_optimizer.setdefault(trials[n].params["optimizer"], set()).add(group)
    assert not by_optimizer["sgd"] & by_optimizer["adam"]  # never in one group


@pytest.mark.slow
def test_a_leaving_trial_is_told_before_its_slot_asks_again(sweep):
    """The sampler has seen every result before the next ask: with 2 slots, trial j (j >= 2) is
    asked only once j - 1 trials before it are told (complete in the study)."""
    check_told_before_asked(sweep, "epochs=range(1, 3)")
