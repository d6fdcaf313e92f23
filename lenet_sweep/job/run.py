"""The Hydra task of a single run (and of each trial a process launcher runs): prepare the job,
train it with the trainer for its device, record it; returns the final metrics."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from omegaconf import DictConfig

from lenet_sweep import signals, speed
from lenet_sweep.core.state import TrainResult
from lenet_sweep.core.train import train
from lenet_sweep.db_files import store_file
from lenet_sweep.errors import outage
from lenet_sweep.job.job import Job, log
from lenet_sweep.sweep.protocol import STORAGE_ENV
from lenet_sweep.tracking import backend


def trainer_for(cfg: DictConfig, device) -> Callable[..., TrainResult]:
    """The CUDA-graph trainer on CUDA (unless cuda_graph=false), else the eager loop."""
    if device.type == "cuda" and cfg.cuda_graph:
        from lenet_sweep.fused.trainer import train_graphed

        return train_graphed
    return train


def run(cfg: DictConfig) -> dict[str, float]:
    """Train once and record it; returns the final metrics (a sweep's objectives pick from them).
    A full disk or a store away raises errors.Outage, naming the store's file where it can."""
    try:
        return _run(cfg)
    except Exception as e:
        uri = backend.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        down = outage(e, store_file(e, uri, os.environ.get(STORAGE_ENV)))
        if down is None or down is e:
            raise
        raise down from e


def _run(cfg: DictConfig) -> dict[str, float]:
    job = Job.prepare(cfg)
    with signals.stop_on_signals(), job.mlrun, speed.training(job.nets(), job.device):
        log.log(logging.INFO if job.link is None else logging.DEBUG, "training on %s", job.device)
        trainer = trainer_for(cfg, job.device)
        try:
            if (seeds := job.seeds()) is not None:
                result = _train_seeds(job, seeds)
            else:
                result = trainer(job.net, job.optimizer, job.data, job.spec())
        except Exception as e:
            job.failed(e)
            raise
        return job.complete(result, seeds.results() if seeds else None)


def _train_seeds(job: Job, seeds) -> TrainResult:
    """A run's seeds trained side by side as one fused group on the job's device."""
    from lenet_sweep.fused.trainer import train_group

    train_group(seeds.members, job.data, job.spec())
    result = seeds.finished()
    job.mlrun.log_metrics(seeds.final_by_seed())
    return result
