"""What training holds between epochs, for either trainer (the eager loop, the fused group):
the metrics so far, the state a hook sees, and the steps both take at an epoch's start and end."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger("lenet_sweep.core.train")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # {epoch, test_acc, ..., train_acc}
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


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """How steps run: what every member of a fused group shares."""

    batch_size: int
    graph: bool = False  # on CUDA, each epoch's steps replayed as CUDA graphs
    progress: bool = True  # a bar over each epoch, on a terminal
    autocast: torch.dtype | None = None  # forward and backward in this dtype; weights stay fp32


@dataclass(frozen=True, kw_only=True)
class TrainSpec(StepSpec):
    """One run's training: its steps, and its own epochs, seed, hooks and checkpoint."""

    epochs: int
    seed: int
    hooks: Sequence[EpochHook] = ()
    resume: object | None = None  # a core.checkpoint.Checkpoint to go on from


# An epoch's sums, by the metric each becomes once divided by its split's examples (the metric's
# name starts with the split's): summed in the trainers, read once an epoch. A new per-epoch
# metric is its sum in each trainer and its name here.
TRAIN_SUMS = ("train_loss", "train_acc")
EVAL_SUMS = ("acc", "loss")  # per evaluated split: test_acc, test_loss, ...


def eval_sums(split_names) -> list[str]:
    return [f"{split}_{metric}" for split in split_names for metric in EVAL_SUMS]


def end_epoch(state: TrainState, sums: dict, sizes: dict, epochs: int, name: str = "") -> dict:
    """Record an epoch from its sums by name (over each split's examples, `sizes`), and log its
    line. The objective comes first: MLflow's compare view plots a run's first metric, so the
    evaluated splits' metrics come before the training's."""
    ordered = sorted(sums, key=lambda key: key in TRAIN_SUMS)
    stats = {"epoch": state.epoch + 1}
    stats.update((key, sums[key] / sizes[key.split("_")[0]]) for key in ordered)
    state.result.history.append(stats)
    state.result.examples_seen += sizes["train"]
    shown = ", ".join(f"{k.replace('_', ' ')} {stats[k]:.4f}" for k in _LINE if k in stats)
    log.info("%sepoch %d/%d: %s", f"{name}: " if name else "", stats["epoch"], epochs, shown)
    return stats


_LINE = ("train_loss", "train_acc", "test_acc", "val_acc")  # train_ch6's, then the validation's


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
