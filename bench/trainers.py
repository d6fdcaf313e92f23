"""Rows (a)-(d): the seed's path as d2l writes it, and this project's trainers, in-process."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lenet_sweep import speed
from lenet_sweep.core.data import FILES, _decompressed, _find, load_splits
from lenet_sweep.core.models import init_xavier, lenet
from lenet_sweep.core.state import StepSpec, TrainSpec

LR, BATCH = 0.9, 256
SWEEP_TIMEOUT_S = 240


def _data_cfg():
    from omegaconf import OmegaConf

    from lenet_sweep import CONFIG_DIR

    return OmegaConf.load(CONFIG_DIR / "data" / "fashion_mnist.yaml")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _row(name, examples, train_s, wall_s, trials, test_acc, device, note="") -> dict:
    return {
        "row": name,
        "examples_per_s": examples / train_s,
        "s_per_trial": wall_s / trials,
        "test_acc": test_acc,
        "peak_mb": _peak_mb(device),
        "wall_s": wall_s,
        "note": note,
    }


def _split_note(result, wall: float) -> str:
    """Where a trainer's wall time went: its steps, its evaluations, the rest (building the nets,
    warm-up and capture, host work between epochs)."""
    rest = wall - result.train_time_s - result.eval_time_s
    return (
        f"steps {result.train_time_s:.2f} s, evaluation {result.eval_time_s:.2f} s, "
        f"the rest {rest:.2f} s"
    )


# --- (a) the seed's path -------------------------------------------------------------------------
def _torchvision_root(tmp: Path) -> Path:
    """The idx files where torchvision's FashionMNIST looks for them (raw/, decompressed)."""
    root, raw = Path(_data_cfg().system_root), tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES.values():
        (raw / name).symlink_to(_decompressed(_find(root, name), None)[0])
    return tmp


def seed_path(epochs: int, device: torch.device) -> dict:
    """train_ch6 as the book runs it: DataLoader batches, float() per batch, steps timed."""
    import torchvision
    from torch.utils import data
    from torchvision import transforms

    with tempfile.TemporaryDirectory() as tmp:
        root, to_tensor = str(_torchvision_root(Path(tmp))), transforms.ToTensor()
        train_set = torchvision.datasets.FashionMNIST(root, train=True, transform=to_tensor)
        test_set = torchvision.datasets.FashionMNIST(root, train=False, transform=to_tensor)
        train_iter = data.DataLoader(train_set, BATCH, shuffle=True, num_workers=4)
        test_iter = data.DataLoader(test_set, BATCH, shuffle=False, num_workers=4)
        _reset_peak(device)
        start = time.perf_counter()
        net = lenet()
        net.apply(init_xavier)
        net.to(device)
        optimizer, loss = torch.optim.SGD(net.parameters(), lr=LR), nn.CrossEntropyLoss()
        step_s, seen = 0.0, 0
        for _ in range(epochs):
            net.train()
            for X, y in train_iter:
                t = time.perf_counter()
                optimizer.zero_grad()
                X, y = X.to(device), y.to(device)
                y_hat = net(X)
                l = loss(y_hat, y)  # noqa: E741 - the book's name
                l.backward()
                optimizer.step()
                with torch.no_grad():  # d2l's Accumulator: a host sync per value
                    float(l * X.shape[0]), float((y_hat.argmax(1) == y).sum()), X.shape[0]
                step_s += time.perf_counter() - t
                seen += X.shape[0]
            net.eval()
            correct = 0
            with torch.no_grad():
                for X, y in test_iter:
                    correct += float((net(X.to(device)).argmax(1) == y.to(device)).sum())
        wall = time.perf_counter() - start
    return _row(
        "(a) seed's path (DataLoader, 4 workers)",
        seen,
        step_s,
        wall,
        1,
        correct / len(test_set),
        device,
        "steps timed as the book does",
    )


# --- (b)-(d) this project's trainers -------------------------------------------------------------
def _splits(device):
    cfg = _data_cfg()
    return load_splits(cfg, device)


def _net(seed: int, device):
    torch.manual_seed(seed)
    net = lenet()
    net.apply(init_xavier)
    net.to(device)
    return net, torch.optim.SGD(net.parameters(), lr=LR)


def solo(name: str, epochs: int, device, graphed: bool, autocast=None) -> dict:
    from lenet_sweep.core.train import train
    from lenet_sweep.fused.trainer import train_graphed

    data = _splits(device)
    _reset_peak(device)
    start = time.perf_counter()
    net, optimizer = _net(42, device)
    trainer = train_graphed if graphed else train
    spec = TrainSpec(batch_size=BATCH, progress=False, autocast=autocast, epochs=epochs, seed=42)
    with speed.training([net], device):  # as a run trains
        result = trainer(net, optimizer, data, spec)
    wall = time.perf_counter() - start
    return _row(
        name,
        result.examples_seen,
        result.train_time_s,
        wall,
        1,
        result.final["test_acc"],
        device,
        _split_note(result, wall),
    )


def fused(k: int, epochs: int, device, autocast=None) -> dict:
    from lenet_sweep.fused.trainer import Member, train_group

    data = _splits(device)
    _reset_peak(device)
    start = time.perf_counter()
    members = [Member(*_net(42 + i, device), epochs=epochs, seed=42 + i) for i in range(k)]
    with speed.training([m.net for m in members], device):  # as a fused launch trains
        train_group(members, data, StepSpec(batch_size=BATCH, graph=True, autocast=autocast))
    wall = time.perf_counter() - start
    accs = [m.result.final["test_acc"] for m in members]
    seen = sum(m.result.examples_seen for m in members)
    train_s = members[0].result.train_time_s  # the group's time: every member rode all of it
    note = f"test acc min {min(accs):.4f}; trial-examples/s" if k > 1 else "trial-examples/s"
    note += "; " + _split_note(members[0].result, wall)
    name = f"(d) fused K={k}" + (", bf16" if autocast else "")
    return _row(name, seen, train_s, wall, k, sum(accs) / k, device, note)
