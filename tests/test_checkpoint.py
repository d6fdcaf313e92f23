"""The checkpoint module: atomic save, find (`last`, dir, file), load-and-check, exact restore."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lenet_sweep.config import identity_text as identity
from lenet_sweep.core import checkpoint
from lenet_sweep.core.checkpoint import Checkpoint
from lenet_sweep.core.data import Splits, load_split
from lenet_sweep.core.state import TrainSpec
from lenet_sweep.core.train import train
from lenet_sweep.errors import UserError
from lenet_sweep.job.job import build_model as build


def _splits(cfg):
    return [load_split(cfg.data, train=t, device=torch.device("cpu")) for t in (True, False)]


def _saved_after(cfg, epochs: int, path):
    """Train `epochs` epochs of cfg, checkpointing into `path` after each."""
    net, opt = build(cfg, torch.device("cpu"))
    hook = lambda state: Checkpoint.capture(state, identity=identity(cfg)).save(path)  # noqa: E731
    return train(
        net,
        opt,
        Splits(*_splits(cfg)),
        TrainSpec(
            epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed, progress=False, hooks=[hook]
        ),
    )


def test_resume_from_a_checkpoint_equals_the_straight_run(make_cfg, tmp_path):
    cfg = make_cfg("epochs=3", "data.train_size=1024", "data.test_size=256")
    path = tmp_path / checkpoint.FILE
    _saved_after(cfg, 1, path)  # an interrupted run: one epoch saved
    saved, found = Checkpoint.load(str(tmp_path), cfg)
    assert found == path and saved.epoch == 1 and len(saved.history) == 1
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, then renamed
    net, opt = build(cfg, torch.device("cpu"))
    resumed = train(
        net,
        opt,
        Splits(*_splits(cfg)),
        TrainSpec(epochs=3, batch_size=cfg.batch_size, seed=cfg.seed, progress=False, resume=saved),
    )
    straight = _saved_after(cfg, 3, tmp_path / "other.pt")
    assert resumed.history == straight.history  # bit-identical on CPU
    assert resumed.examples_seen == straight.examples_seen == 3 * 1024


def test_load_refuses_another_config_a_finished_run_and_foreign_files(make_cfg, tmp_path):
    cfg = make_cfg("epochs=1", "data.train_size=512")
    path = tmp_path / checkpoint.FILE
    _saved_after(cfg, 1, path)
    with pytest.raises(UserError, match="was made with another model/optimizer/data/lr"):
        Checkpoint.load(str(path), make_cfg("epochs=2", "data.train_size=512", "lr=0.5"))
    with pytest.raises(UserError, match="already has 1 epochs; raise epochs to train on"):
        Checkpoint.load(str(path), cfg)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="is not a lenet_sweep checkpoint"):
        Checkpoint.load(str(path), cfg)
    path.write_bytes(b"torn")
    with pytest.raises(UserError, match="is not a lenet_sweep checkpoint"):
        Checkpoint.load(str(path), cfg)


def test_find_by_dir_file_and_last(tmp_path, monkeypatch):
    (tmp_path / checkpoint.FILE).write_bytes(b"x")
    assert checkpoint.find(str(tmp_path)) == tmp_path / checkpoint.FILE
    assert checkpoint.find(str(tmp_path / checkpoint.FILE)) == tmp_path / checkpoint.FILE
    with pytest.raises(UserError, match="no checkpoint.pt there"):
        checkpoint.find(str(tmp_path / "nothing"))
    monkeypatch.setattr(checkpoint, "OUTPUTS_DIR", tmp_path / "outputs")
    with pytest.raises(UserError, match="resume=last: no checkpoint under"):
        checkpoint.find("last")
    for age, name in ((100, "11-00-00"), (200, "10-00-00")):
        run_dir = tmp_path / "outputs" / "runs" / "2026-01-01" / name
        run_dir.mkdir(parents=True)
        (run_dir / checkpoint.FILE).write_bytes(b"x")
        os.utime(run_dir / checkpoint.FILE, (time.time() - age, time.time() - age))
    assert checkpoint.find("last").parent.name == "11-00-00"  # the newest by mtime
