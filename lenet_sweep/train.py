"""train_ch6 as one readable loop: GPU-resident data, metrics read once per epoch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lenet_sweep import signals
from lenet_sweep.data import Split
from lenet_sweep.errors import UserError

log = logging.getLogger(__name__)


class Diverged(UserError):
    """The training loss became NaN, inf, or larger than the divergence threshold."""

    def __init__(self, epoch: int, loss: float, threshold: float | None = None):
        limit = "" if threshold is None or not math.isfinite(loss) else f" > {threshold:g}"
        super().__init__(
            f"training diverged at epoch {epoch}: train loss {loss:g}{limit}; "
            "lower lr or change the optimizer"
        )
        self.epoch, self.loss = epoch, loss


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


def evaluate_accuracy(net: nn.Module, split: Split, batch_size: int) -> float:
    """Test accuracy in eval mode, fixed order, counted on the device and read once."""
    net.eval()
    correct = torch.zeros((), device=split.labels.device)
    with torch.no_grad():
        for X, y in split.batches(batch_size):
            correct += (net(X).argmax(dim=1) == y).sum()
    return correct.item() / len(split)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint


def train(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_split: Split,
    test_split: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[dict, TrainResult], None] | None = None,
    checkpoint_path: Path | None = None,
    checkpoint_extra: dict | None = None,
    resume: dict | None = None,
    divergence_threshold: float | None = None,
) -> TrainResult:
    """Train for `epochs` epochs as train_ch6 does; `on_epoch` sees each epoch's metrics.

    `resume` is a checkpoint dict written by an earlier call: training continues after its
    epoch with the same RNG streams, so the result equals an uninterrupted run. Training stops
    with Diverged when the epoch's loss is NaN/inf or above `divergence_threshold`.
    """
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator(device=device).manual_seed(seed)
    result, start_epoch = TrainResult(), 0
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        shuffle.set_state(resume["shuffle_rng"])
        torch.set_rng_state(resume["torch_rng"])
        result = TrainResult(
            list(resume["history"]),
            resume["train_time_s"],
            resume["examples_seen"],
            resume["eval_time_s"],
        )
        start_epoch = resume["epoch"]
    num_batches = train_split.num_batches(batch_size)
    for epoch in range(start_epoch + 1, epochs + 1):
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        bar = tqdm(
            total=num_batches,
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
            disable=not progress,
            dynamic_ncols=True,
        )
        _sync(device)
        start = time.perf_counter()
        for X, y in train_split.batches(batch_size, shuffle):
            optimizer.zero_grad(set_to_none=True)
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
        bar.close()
        n = len(train_split)
        result.examples_seen += n
        eval_start = time.perf_counter()
        stats = {
            "epoch": epoch,
            "train_loss": train_loss / n,
            "train_acc": train_correct / n,
            "test_acc": evaluate_accuracy(net, test_split, batch_size),
        }
        result.eval_time_s += time.perf_counter() - eval_start
        result.history.append(stats)
        log.info(
            "epoch %d/%d: train loss %.4f, train acc %.4f, test acc %.4f",
            epoch,
            epochs,
            stats["train_loss"],
            stats["train_acc"],
            stats["test_acc"],
        )
        loss_now = stats["train_loss"]
        if not math.isfinite(loss_now) or (
            divergence_threshold and loss_now > divergence_threshold
        ):
            raise Diverged(epoch, loss_now, divergence_threshold)
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                {
                    "epoch": epoch,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "shuffle_rng": shuffle.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": result.history,
                    "train_time_s": result.train_time_s,
                    "examples_seen": result.examples_seen,
                    "eval_time_s": result.eval_time_s,
                    **(checkpoint_extra or {}),
                },
            )
        if on_epoch is not None:
            on_epoch(stats, result)
    return result
