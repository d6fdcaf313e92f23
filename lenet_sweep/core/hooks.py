"""Per-epoch hooks: what happens between epochs, kept out of the hot loop.

Each is a small callable built here and handed to `train(hooks=[...])`, called in order with the
TrainState after every epoch; raising stops training (the way Lightning's and optuna-integration's
callbacks work). The fused trainer calls the same hooks once per trial. A sweep's pruning hook
lives beside the trial it reports to (lenet_sweep.sweep.trial_link.prune).
"""

from __future__ import annotations

import math
from pathlib import Path

from lenet_sweep.core.checkpoint import Checkpoint
from lenet_sweep.core.state import EpochHook, TrainState
from lenet_sweep.errors import EXIT_DIVERGED, UserError


class Diverged(UserError):
    """The training loss became NaN, inf, or larger than the divergence threshold."""

    exit_code = EXIT_DIVERGED

    def __init__(self, epoch: int, loss: float, threshold=None, seed: int | None = None):
        limit = "" if threshold is None or not math.isfinite(loss) else f" > {threshold:g}"
        which = "" if seed is None else f"seed {seed}: "  # one of a run's seeds
        super().__init__(
            f"{which}training diverged at epoch {epoch}: train loss {loss:g}{limit}; "
            "lower lr or change the optimizer"
        )
        self.epoch, self.loss, self.threshold = epoch, loss, threshold

    def of_seed(self, seed: int) -> Diverged:
        """The same divergence, saying which of a run's seeds it was."""
        return Diverged(self.epoch, self.loss, self.threshold, seed)


def stop_on_divergence(threshold: float | None) -> EpochHook:
    """Raise Diverged when the epoch's train loss is NaN/inf or above `threshold` (None: off)."""

    def hook(state: TrainState) -> None:
        loss = state.stats["train_loss"]
        if not math.isfinite(loss) or (threshold and loss > threshold):
            raise Diverged(state.epoch, loss, threshold)

    return hook


def save_checkpoint(path: Path, **extra) -> EpochHook:
    """Write the epoch's checkpoint (atomically) to `path`; `extra` goes into every one."""
    return lambda state: Checkpoint.capture(state, **extra).save(path)


def log_epoch(mlrun) -> EpochHook:
    """The epoch's metrics to an MLflow TrackedRun, at step = epoch."""
    return lambda state: mlrun.log_epoch(state.stats)
