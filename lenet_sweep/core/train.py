"""train_ch6 as one readable loop: GPU-resident data, metrics read once per epoch.

Everything that happens between epochs (MLflow, checkpoints, divergence, pruning) is a hook
(lenet_sweep.core.hooks): a callable that gets the TrainState after each epoch and may raise to
stop.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from lenet_sweep import signals
from lenet_sweep.core import state as states
from lenet_sweep.core.data import Split, Splits
from lenet_sweep.core.state import TRAIN_SUMS, TrainSpec, eval_sums


def mixed(device: torch.device, autocast: torch.dtype | None):
    """The forward (and so the backward) under autocast to `autocast`; a no-op for None."""
    return torch.autocast(device.type, autocast, enabled=autocast is not None)


def evaluate(
    net: nn.Module, splits: dict[str, Split], batch_size: int, autocast: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Each split's sums in eval mode, fixed order, on the device (`test_acc`: correct
    predictions, `test_loss`: summed cross-entropy; core.state.EVAL_SUMS), not read yet."""
    net.eval()
    device = next(iter(splits.values())).labels.device
    sums = {key: torch.zeros((), device=device) for key in eval_sums(splits)}
    with torch.no_grad():
        for name, split in splits.items():
            for X, y in split.batches(batch_size):
                with mixed(X.device, autocast):
                    y_hat = net(X)
                sums[f"{name}_acc"] += (y_hat.argmax(dim=1) == y).sum()
                sums[f"{name}_loss"] += F.cross_entropy(y_hat.float(), y, reduction="sum")
    return sums


def evaluate_accuracy(net: nn.Module, split: Split, batch_size: int, autocast=None) -> float:
    """One split's accuracy (`evaluate`), read."""
    return evaluate(net, {"split": split}, batch_size, autocast)["split_acc"].item() / len(split)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(net: nn.Module, optimizer: torch.optim.Optimizer, data: Splits, spec: TrainSpec):
    """Train `spec.epochs` epochs as train_ch6 does, on the data's device. `spec.resume` goes on
    after its checkpoint's epoch with the same RNG streams, so the result equals an uninterrupted
    run's. Returns the TrainResult."""
    device = data.train.labels.device
    loss_fn = nn.CrossEntropyLoss()
    state = states.start(net, optimizer, spec.seed, device, spec.resume)
    result = state.result
    num_batches = data.train.num_batches(spec.batch_size)
    for epoch in range(state.epoch + 1, spec.epochs + 1):
        net.train()
        sums = {key: torch.zeros((), device=device) for key in TRAIN_SUMS}
        bar = states.progress_bar(num_batches, f"epoch {epoch}/{spec.epochs}", spec.progress)
        _sync(device)
        start = time.perf_counter()
        for X, y in data.train.batches(spec.batch_size, state.shuffle):
            optimizer.zero_grad(set_to_none=True)
            with mixed(device, spec.autocast):
                y_hat = net(X)
                loss = loss_fn(y_hat, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # sample-weighted sums, as the seed's Accumulator
                sums["train_loss"] += loss.detach() * y.shape[0]
                sums["train_acc"] += (y_hat.argmax(dim=1) == y).sum()
            bar.update()
            signals.check()  # Ctrl-C / SIGTERM: stop between batches
        _sync(device)
        result.train_time_s += time.perf_counter() - start
        bar.close()
        eval_start = time.perf_counter()
        sums.update(evaluate(net, data.evaluated(), spec.batch_size, spec.autocast))
        read = dict(zip(sums, torch.stack(list(sums.values())).tolist(), strict=True))  # one sync
        result.eval_time_s += time.perf_counter() - eval_start
        states.end_epoch(state, read, data.sizes(), spec.epochs)
        for hook in spec.hooks:
            hook(state)
    return result
