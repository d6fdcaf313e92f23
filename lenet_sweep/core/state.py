"""What training holds between epochs, for either trainer (the eager loop, the fused group):
the metrics so far, the state a hook sees, and the steps both take at an epoch's start and end."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger("lenet_sweep.core.train")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # {epoch, test_acc, train_loss, train_acc}
    train_time_s: float = 0.0
    examples_seen: int = 0
    eval_time_s: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1]

    @property
    def examples_per_sec(self) -> float:
        return self.examples_seen / self.train_time_s if self.train_time_s > 0 else float("nan")

    def metrics(self) -> dict[str, float]:
        """The final epoch's metrics and the totals: what a run returns, and objectives name."""
        totals = {"train_time_s": self.train_time_s, "examples_per_sec": self.examples_per_sec}
        return {**{k: v for k, v in self.final.items() if k != "epoch"}, **totals}


@dataclass
class TrainState:
    """What a hook sees after an epoch: the model, its optimizer, the shuffle RNG, the metrics."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator
    result: TrainResult

    @property
    def epoch(self) -> int:
        return self.result.history[-1]["epoch"] if self.result.history else 0

    @property
    def stats(self) -> dict:
        return self.result.history[-1]


EpochHook = Callable[[TrainState], None]


def start(net, optimizer, seed: int, device: torch.device, resume=None) -> TrainState:
    """A training's state at its start: the shuffle stream seeded, or everything put back from
    `resume` (a Checkpoint), so the result equals an uninterrupted run's."""
    shuffle = torch.Generator(device=device).manual_seed(seed)
    result = resume.restore(net, optimizer, shuffle) if resume else TrainResult()
    return TrainState(net, optimizer, shuffle, result)


def end_epoch(
    state: TrainState,
    loss_sum: float,
    correct: float,
    test_acc: float,
    n: int,
    epochs: int,
    name: str = "",
) -> dict:
    """Record an epoch from its training sums over `n` examples and its test accuracy, and log
    its line. The objective comes first: MLflow's compare view plots a run's first metric."""
    stats = {
        "epoch": state.epoch + 1,
        "test_acc": test_acc,
        "train_loss": loss_sum / n,
        "train_acc": correct / n,
    }
    state.result.history.append(stats)
    state.result.examples_seen += n
    log.info(
        "%sepoch %d/%d: train loss %.4f, train acc %.4f, test acc %.4f",
        f"{name}: " if name else "",
        stats["epoch"],
        epochs,
        stats["train_loss"],
        stats["train_acc"],
        stats["test_acc"],
    )
    return stats


def progress_bar(total: int, desc: str, progress: bool, unit: str = "it") -> tqdm:
    """A bar on a terminal only: piped output (CI, cluster logs) gets the epoch lines alone."""
    return tqdm(
        total=total,
        desc=desc,
        leave=False,
        unit=unit,
        dynamic_ncols=True,
        disable=not (progress and sys.stderr.isatty()),
    )
