"""train_ch6 as one readable loop: GPU-resident data, metrics read once per epoch.

Everything that happens between epochs (MLflow, checkpoints, divergence, pruning) is a hook
(lenet_sweep.core.hooks): a callable that gets the TrainState after each epoch and may raise to
stop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lenet_sweep import signals
from lenet_sweep.core import state as states
from lenet_sweep.core.data import Split
from lenet_sweep.core.state import EpochHook, TrainResult

if TYPE_CHECKING:
    from lenet_sweep.core.checkpoint import Checkpoint


def mixed(device: torch.device, autocast: torch.dtype | None):
    """The forward (and so the backward) under autocast to `autocast`; a no-op for None."""
    return torch.autocast(device.type, autocast, enabled=autocast is not None)


def evaluate_accuracy(
    net: nn.Module, split: Split, batch_size: int, autocast: torch.dtype | None = None
) -> float:
    """Test accuracy in eval mode, fixed order, counted on the device and read once."""
    net.eval()
    correct = torch.zeros((), device=split.labels.device)
    with torch.no_grad():
        for X, y in split.batches(batch_size):
            with mixed(X.device, autocast):
                y_hat = net(X)
            correct += (y_hat.argmax(dim=1) == y).sum()
    return correct.item() / len(split)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
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
    loss_fn = nn.CrossEntropyLoss()
    state = states.start(net, optimizer, seed, device, resume)
    result = state.result
    n, num_batches = len(train_split), train_split.num_batches(batch_size)
    for epoch in range(state.epoch + 1, epochs + 1):
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        bar = states.progress_bar(num_batches, f"epoch {epoch}/{epochs}", progress)
        _sync(device)
        start = time.perf_counter()
        for X, y in train_split.batches(batch_size, state.shuffle):
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
        bar.close()
        eval_start = time.perf_counter()
        test_acc = evaluate_accuracy(net, test_split, batch_size, autocast)
        result.eval_time_s += time.perf_counter() - eval_start
        states.end_epoch(state, train_loss, train_correct, test_acc, n, epochs)
        for hook in hooks:
            hook(state)
    return result
