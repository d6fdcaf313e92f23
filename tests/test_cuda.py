"""The CUDA paths against the eager loop and the CPU: run wherever a GPU is visible (the lent
H100/H200: ../shared/tools/device-pack), skipped elsewhere."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lenet_sweep.core.checkpoint import Checkpoint
from lenet_sweep.core.data import Splits, load_split
from lenet_sweep.core.hooks import save_checkpoint
from lenet_sweep.core.state import StepSpec, TrainSpec
from lenet_sweep.core.train import train
from lenet_sweep.fused.trainer import Member, train_graphed
from lenet_sweep.job.job import build_model as build
from tests.conftest import check_told_before_asked, train_refilled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda:0")


def _setup(make_cfg, device, *overrides):
    cfg = make_cfg("data.train_size=null", "data.test_size=null", *overrides)
    return cfg, load_split(cfg.data, True, device), load_split(cfg.data, False, device)


def _run(trainer, cfg, splits, device, epochs, **kw):
    net, optimizer = build(cfg, device)
    return trainer(
        net,
        optimizer,
        Splits(*splits),
        TrainSpec(epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed, progress=False, **kw),
    )


def _close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@pytest.mark.parametrize("overrides", [(), ("data.train_size=1000", "batch_size=300")])
def test_graph_trainer_matches_eager_on_cuda(make_cfg, overrides):
    """Full data (last batch 96), and an odd last batch (1000 = 3 x 300 + 100)."""
    cfg, *splits = _setup(make_cfg, CUDA, *overrides)
    epochs = 10 if not overrides else 4
    eager = _run(train, cfg, splits, CUDA, epochs)
    graphed = _run(train_graphed, cfg, splits, CUDA, epochs)
    for e, g in zip(eager.history, graphed.history, strict=True):
        assert _close(e["train_loss"], g["train_loss"], 1e-5), (e, g)
        assert abs(e["test_acc"] - g["test_acc"]) <= 0.002, (e, g)
    if not overrides:
        assert 0.70 <= graphed.final["test_acc"] <= 0.90  # the seed's band after 10 epochs


def test_fused_member_matches_its_solo_cpu_run(make_cfg):
    cfg_cpu, *cpu_splits = _setup(make_cfg, torch.device("cpu"))
    solo = _run(train, cfg_cpu, cpu_splits, torch.device("cpu"), 3)
    cfg, *splits = _setup(make_cfg, CUDA)
    members = []
    for lr, seed in [(0.9, cfg.seed), (0.3, 1), (0.05, 2), (2.0, 3)]:
        other = make_cfg(f"lr={lr}", f"seed={seed}", "data.train_size=null", "data.test_size=null")
        members.append(Member(*build(other, CUDA), epochs=3 if lr != 0.3 else 1, seed=seed))
    handed_over = {}  # each member's weights as it left, read while the others trained on

    def on_leave(member):
        handed_over[id(member)] = [p.cpu() for p in member.net.parameters()]

    spec = StepSpec(batch_size=cfg.batch_size, graph=True)
    train_refilled(members, Splits(*splits), spec, on_leave=on_leave)
    for m in members:  # what on_leave read is the member's final state, not a stale copy
        assert all(
            torch.equal(a, b.cpu())
            for a, b in zip(handed_over[id(m)], m.net.parameters(), strict=True)
        )
    twin = members[0].result.history
    assert _close(solo.history[0]["train_loss"], twin[0]["train_loss"], 1e-4)
    assert abs(solo.final["test_acc"] - twin[-1]["test_acc"]) <= 0.02
    assert [len(m.result.history) for m in members] == [3, 1, 3, 3]  # the 1-epoch one left


def test_graph_trainer_resumes_to_the_uninterrupted_result(make_cfg, tmp_path):
    cfg, *splits = _setup(make_cfg, CUDA)
    whole = _run(train_graphed, cfg, splits, CUDA, 4)

    def stop_after_two(state):
        if state.epoch == 2:
            raise KeyboardInterrupt

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(train_graphed, cfg, splits, CUDA, 4, hooks=[save_checkpoint(path), stop_after_two])
    state = torch.load(path, map_location="cpu", weights_only=True)
    resumed = _run(train_graphed, cfg, splits, CUDA, 4, resume=Checkpoint(**state))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert _close(a["train_loss"], b["train_loss"], 1e-5) and a["test_acc"] == b["test_acc"]


def test_bf16_stays_in_the_seeds_band_graphed_or_eager(make_cfg):
    """precision=bf16: the graph trainer and the eager loop, both near fp32. Their accuracies are
    not compared epoch by epoch: near chance (epoch 1) bf16 rounding flips the argmax of nearly
    tied logits (0.230 against 0.165 on an H200, with train losses equal to 1e-5)."""
    cfg, *splits = _setup(make_cfg, CUDA)
    fp32 = _run(train_graphed, cfg, splits, CUDA, 10)
    graphed = _run(train_graphed, cfg, splits, CUDA, 10, autocast=torch.bfloat16)
    eager = _run(train, cfg, splits, CUDA, 10, autocast=torch.bfloat16)
    assert _close(eager.history[0]["train_loss"], graphed.history[0]["train_loss"], 1e-4)
    assert graphed.history != fp32.history  # it did run in bf16
    for run in (graphed, eager):
        assert 0.70 <= run.final["test_acc"] <= 0.90  # the seed's band
        assert _close(run.final["train_loss"], fp32.final["train_loss"], 0.05)


def test_a_graphed_run_steps_torch_optim_in_its_own_process():
    """A run's CUDA path as a process (build, the graph trainer, checkpoints): torch.optim's own
    SGD, its state captured after every epoch."""
    code = """
import sys
import torch
from hydra import compose, initialize_config_dir
from lenet_sweep import CONFIG_DIR, config
from lenet_sweep.core.checkpoint import Checkpoint
from lenet_sweep.core.data import load_splits
from lenet_sweep.core.state import TrainSpec
from lenet_sweep.fused.trainer import train_graphed
from lenet_sweep.job.job import build_model as build
config.register()
with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["data.train_size=1000", "data.test_size=500"])
cuda = torch.device("cuda:0")
net, opt = build(cfg, cuda)
saved = []
train_graphed(net, opt, load_splits(cfg.data, cuda),
              TrainSpec(epochs=2, batch_size=256, seed=0, progress=False,
                        hooks=[lambda state: saved.append(Checkpoint.capture(state))]))
print(len(saved), type(opt).__module__, sorted(saved[-1].optimizer))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "torch.optim.sgd", "['param_groups',", "'state']"]


def test_a_refilled_slot_replays_the_captured_epoch_with_the_newcomer(make_cfg):
    """Refill on CUDA: a newcomer written into a freed slot trains, without a recapture, as its
    run alone (graphed) does: its own init, lr, optimizer state and shuffle."""
    from lenet_sweep.fused.trainer import Occupancy

    cfg, *splits = _setup(make_cfg, CUDA, "data.train_size=4096", "data.test_size=1024")
    specs = [(0.9, 1, 1), (0.3, 2, 3), (0.5, 3, 2), (0.1, 4, 2)]  # lr, seed, epochs
    members = []
    for lr, seed, epochs in specs:
        net, optimizer = build(make_cfg(f"lr={lr}", f"seed={seed}"), CUDA)
        members.append(Member(net, optimizer, epochs, seed))
    queue, occupancy = members[2:], Occupancy()
    spec = StepSpec(batch_size=256, graph=True)
    refill = lambda slot: queue.pop(0) if queue else None  # noqa: E731
    train_refilled(members[:2], Splits(*splits), spec, refill, occupancy=occupancy)
    assert [len(m.result.history) for m in members] == [1, 3, 2, 2]
    assert occupancy.live_epochs == 8
    for (lr, seed, epochs), member in zip(specs, members, strict=True):
        solo_cfg = make_cfg(
            f"lr={lr}", f"seed={seed}", "data.train_size=4096", "data.test_size=1024"
        )
        solo = _run(train_graphed, solo_cfg, splits, CUDA, epochs)
        fused = member.result.history
        assert _close(fused[0]["train_loss"], solo.history[0]["train_loss"], 1e-4), (fused, solo)
        assert abs(fused[-1]["test_acc"] - solo.final["test_acc"]) <= 0.02


def test_a_leaving_trial_is_told_before_its_slot_asks_again_on_cuda(sweep):
    """As on the CPU (tests/test_refill.py), though on CUDA the next epoch is launched before the
    hooks: trial j (j >= 2) of 2 slots is asked only once j - 1 trials are told."""
    check_told_before_asked(sweep, "epochs=range(1, 4)", "device=cuda")
