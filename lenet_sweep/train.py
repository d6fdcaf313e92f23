"""train_ch6 as one readable loop: GPU-resident data, metrics read once per epoch.

Everything that happens between epochs (MLflow, checkpoints, divergence, pruning) is a hook
(lenet_sweep.hooks): a callable that gets the TrainState after each epoch and may raise to stop.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from lenet_sweep import host_memory, signals, startup_gc
from lenet_sweep.cpu_kernels import c_kernels
from lenet_sweep.data import Split
from lenet_sweep.models import channels_last_gradients, nchw_input_gradients
from lenet_sweep.optim import Optimizer

if TYPE_CHECKING:
    from lenet_sweep.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: list[dict] = field(
        default_factory=list
    )  # one {epoch, train_loss, train_acc, test_acc}
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
    optimizer: Optimizer
    shuffle: torch.Generator
    result: TrainResult

    @property
    def epoch(self) -> int:
        return self.result.history[-1]["epoch"] if self.result.history else 0

    @property
    def stats(self) -> dict:
        return self.result.history[-1]


EpochHook = Callable[[TrainState], None]


def mixed(device: torch.device, autocast: torch.dtype | None):
    """The forward (and so the backward) under autocast to `autocast`; a no-op for None."""
    return torch.autocast(device.type, autocast, enabled=autocast is not None)


def evaluate_accuracy(net: nn.Module, split: Split, batch_size: int,
                      autocast: torch.dtype | None = None) -> float:  # fmt: skip
    """Test accuracy in eval mode, fixed order, counted on the device and read once."""
    net.eval()
    correct = torch.zeros((), device=split.labels.device)
    with torch.no_grad():
        for X, y in split.batches(batch_size):
            with mixed(X.device, autocast):
                y_hat = net(X)
            correct += (y_hat.argmax(dim=1) == y).sum()
    return correct.item() / len(split)


def training_begins(device: torch.device) -> None:
    """What the process settles once training starts (either trainer): the collector back at its
    pace (startup_gc) and, on the CPU, the memory a step frees kept for the next (host_memory)."""
    startup_gc.started()
    if device.type == "cpu":
        host_memory.keep_freed_memory()  # or larger steps page their memory in anew each time


@contextlib.contextmanager
def _cpu_kernels(net: nn.Module):
    """On the CPU: Flatten hands its gradient back channels-last, convolutions with few input
    channels compute their input gradient in NCHW order (models.py says why, for each), and the
    first block's convolution and pools run C kernels (cpu_kernels.py)."""
    with channels_last_gradients(), nchw_input_gradients(net), c_kernels(net):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    net: nn.Module,
    optimizer: Optimizer,
    train_split: Split,
    test_split: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    hooks: Sequence[EpochHook] = (),
    resume: Checkpoint | None = None,
    autocast: torch.dtype | None = None,
) -> TrainResult:
    """Train `epochs` epochs as train_ch6 does, on the data's device. `resume` goes on after its
    checkpoint's epoch with the same RNG streams, so the result equals an uninterrupted run's."""
    device = train_split.labels.device
    training_begins(device)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator(device=device).manual_seed(seed)
    result = resume.restore(net, optimizer, shuffle) if resume else TrainResult()
    state = TrainState(net, optimizer, shuffle, result)
    n, num_batches = len(train_split), train_split.num_batches(batch_size)
    with _cpu_kernels(net) if device.type == "cpu" else contextlib.nullcontext():
        for epoch in range(state.epoch + 1, epochs + 1):
            net.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            # A bar on a terminal only: piped output (CI, cluster logs) gets the epoch lines alone.
            bar = tqdm(total=num_batches, desc=f"epoch {epoch}/{epochs}", leave=False,
                       disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)  # fmt: skip
            _sync(device)
            start = time.perf_counter()
            for X, y in train_split.batches(batch_size, shuffle):
                optimizer.zero_grad(set_to_none=True)
                with mixed(device, autocast):
                    y_hat = net(X)
                    loss = loss_fn(y_hat, y)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # sample-weighted sums, as the seed's Accumulator
                    loss_sum += loss.detach() * y.shape[0]
                    correct += (y_hat.argmax(dim=1) == y).sum()
                bar.update()
                signals.check()  # Ctrl-C / SIGTERM: stop between batches
            # The epoch's one host sync: both sums read together.
            train_loss, train_correct = torch.stack([loss_sum, correct]).tolist()
            result.train_time_s += time.perf_counter() - start
            result.examples_seen += n
            bar.close()
            eval_start = time.perf_counter()
            test_acc = evaluate_accuracy(net, test_split, batch_size, autocast)
            result.eval_time_s += time.perf_counter() - eval_start
            # The objective first: MLflow's compare view plots a run's first metric.
            stats = {"epoch": epoch, "test_acc": test_acc, "train_loss": train_loss / n,
                     "train_acc": train_correct / n}  # fmt: skip
            result.history.append(stats)
            log.info("epoch %d/%d: train loss %.4f, train acc %.4f, test acc %.4f",
                     epoch, epochs, stats["train_loss"], stats["train_acc"], test_acc)  # fmt: skip
            for hook in hooks:
                hook(state)
    return result
