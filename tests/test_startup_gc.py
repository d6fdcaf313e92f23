"""The command line's start-up runs the cyclic collector at a slower pace; training restores it."""

import subprocess
import sys

import pytest

# Imports what a run imports, counting the collector's full (generation 2) collections, then
# trains (eager or a fused group) on 64 random examples; prints the full collections during the
# imports, then the thresholds and the number of frozen objects after training starts.
PROGRAM = """
import gc, sys
full = [0]
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                    and full.__setitem__(0, full[0] + 1))
if sys.argv[1] == "user":
    gc.set_threshold(100_000, 10, 10)
if sys.argv[1] != "plain":
    import lenet_sweep.cli  # the command line's module: slows the pace on import
import torch, mlflow, mlflow.store.tracking.sqlalchemy_store, matplotlib.figure
print(full[0], *gc.get_threshold())
from lenet_sweep import speed
from lenet_sweep.core.data import Split, Splits
from lenet_sweep.core.state import StepSpec, TrainSpec
from lenet_sweep.core.models import lenet
from torch.optim import SGD
split = Split(torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)))
net = lenet()
with speed.training([net], torch.device("cpu")):  # as a job trains
    if sys.argv[1] == "fused":
        from lenet_sweep.fused.trainer import Member, train_group
        train_group([Member(net, SGD(net.parameters(), lr=0.1), epochs=1, seed=0)],
                    Splits(split, split), StepSpec(batch_size=32))
    else:
        from lenet_sweep.core.train import train
        train(net, SGD(net.parameters(), lr=0.1), Splits(split, split),
              TrainSpec(epochs=1, batch_size=32, seed=0, progress=False))
print(*gc.get_threshold(), gc.get_freeze_count())
"""


def _run(mode: str, **env) -> tuple[list[int], list[int]]:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    imports, trained = proc.stdout.splitlines()[-2:]
    return [int(x) for x in imports.split()], [int(x) for x in trained.split()]


@pytest.mark.slow
def test_start_up_makes_no_full_collection_and_training_restores_the_pace():
    (full, *pace), _ = _run("plain")
    assert full >= 3 and pace == [700, 10, 10]  # Python's default pace walks the heap repeatedly
    for trainer in ("eager", "fused"):
        (full, *pace), (*after, frozen) = _run(trainer)
        assert full == 0 and pace == [50_000, 20, 100], trainer
        assert after == [700, 10, 10] and frozen > 100_000, trainer  # the start-up heap


@pytest.mark.slow
def test_a_users_slower_pace_is_left_alone():
    (_, *pace), (*after, frozen) = _run("user")
    assert pace == after == [100_000, 10, 10] and frozen == 0


@pytest.mark.slow
def test_the_start_up_pace_can_be_turned_off():
    (_, *pace), (*after, frozen) = _run("eager", LENET_SWEEP_SPEEDUPS="fast_exit")
    assert pace == after == [700, 10, 10] and frozen == 0
