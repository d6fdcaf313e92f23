"""Checkpoints: what a run saves after each epoch, how `resume=` finds one, and the check that it
belongs to the config being resumed. Saved as plain tensors and lists, loaded weights_only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from lenet_sweep import OUTPUTS_DIR
from lenet_sweep.config.identity import identity_text
from lenet_sweep.core.state import TrainResult, TrainState
from lenet_sweep.errors import UserError

FILE = "checkpoint.pt"


@dataclass
class Checkpoint:
    epoch: int
    model: dict
    optimizer: dict
    shuffle_rng: torch.Tensor
    torch_rng: torch.Tensor
    history: list[dict]  # from here to eval_time_s: the TrainResult so far
    train_time_s: float
    examples_seen: int
    eval_time_s: float
    mlflow_run_id: str | None = None
    identity: str | None = None

    @classmethod
    def capture(cls, state: TrainState, **extra) -> Checkpoint:
        """The state after an epoch; `extra` names the run it belongs to."""
        model, optimizer = state.net.state_dict(), state.optimizer.state_dict()
        return cls(
            state.epoch,
            model,
            optimizer,
            state.shuffle.get_state(),
            torch.get_rng_state(),
            **vars(state.result),
            **extra,
        )

    def save(self, path: Path) -> None:
        # Into memory first: on a full disk, writing it raises OSError(ENOSPC), where torch.save
        # raises a RuntimeError from C++ that names no errno.
        buffer = io.BytesIO()
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, buffer)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(buffer.getbuffer())
            tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from e

    def restore(self, net, optimizer, shuffle: torch.Generator) -> TrainResult:
        """Put net, optimizer and both RNG streams back; returns the metrics so far."""
        net.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        shuffle.set_state(self.shuffle_rng)
        torch.set_rng_state(self.torch_rng)
        so_far = {f.name: getattr(self, f.name) for f in fields(TrainResult)}
        return TrainResult(**{**so_far, "history": list(self.history)})

    @classmethod
    def load(cls, spec: str, cfg) -> tuple[Checkpoint, Path]:
        """The checkpoint `resume=spec` names, checked against the config it will continue."""
        path = find(spec)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
            checkpoint = cls(**state)
        except Exception as e:  # noqa: BLE001 - torn or foreign file
            raise UserError(
                f"resume: {path} is not a lenet_sweep checkpoint ({type(e).__name__}); "
                "give another run"
            ) from e
        if checkpoint.identity != identity_text(cfg):
            raise UserError(
                f"resume: {path} was made with another model/optimizer/data/lr/batch_size/seed; "
                "resume with the same settings (see that run's .hydra/config.yaml)"
            )
        if checkpoint.epoch >= cfg.epochs:
            raise UserError(
                f"resume: {path} already has {checkpoint.epoch} epochs; raise epochs to train on"
            )
        return checkpoint, path


def find(spec: str) -> Path:
    """resume=<run dir> | <checkpoint file> | last -> the checkpoint file."""
    if spec == "last":
        runs = OUTPUTS_DIR / "runs"
        found = sorted(runs.glob(f"*/*/{FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"resume=last: no checkpoint under {runs}; give resume=<run dir>")
        return found[-1]
    path = Path(spec).expanduser()
    path = path / FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"resume={spec}: no {FILE} there; give a run's output dir or `last`")
    return path
