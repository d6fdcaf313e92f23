"""A sweep's report: the results file in the official sweeper's shape, and its closing lines."""

from __future__ import annotations

import logging
import os

from lenet_sweep import protocol

log = logging.getLogger("lenet_sweep.sweep")


def values(trial, objectives: list[str]) -> str:
    return " ".join(
        f"{name}={value:.4g}" for name, value in zip(objectives, trial.values, strict=True)
    )


def results(best: list, directions: list[str], objectives: list[str]) -> dict:
    """optimization_results.yaml, in the official sweeper's shape (solutions: several)."""
    if len(directions) == 1:
        return {"name": "optuna", "best_params": dict(best[0].params),
                "best_value": best[0].value}  # fmt: skip
    solutions = [{"number": t.number, "params": dict(t.params), "values": list(t.values)}
                 for t in best]  # fmt: skip
    return {"name": "optuna", "objectives": dict(zip(objectives, directions, strict=True)),
            "solutions": solutions}  # fmt: skip


def log_overhead(trials, elapsed: float) -> None:
    here = [t for t in trials if t.user_attrs.get(protocol.WORKER_PID) == os.getpid()]
    busy = sum(t.user_attrs.get(protocol.TRAIN_TIME_S, 0.0) for t in here)
    if not (here and busy):
        return
    if busy > elapsed:  # trials trained side by side (hydra/launcher=fused)
        log.info("training + evaluation: %.1f trial-seconds in %.1fs of sweep (trials "
                 "trained together)", busy, elapsed)  # fmt: skip
        return
    log.info("time in training + evaluation: %.1fs of %.1fs; overhead %.2fs per trial "
             "(Hydra, Optuna, MLflow, data loading)",
             busy, elapsed, (elapsed - busy) / len(here))  # fmt: skip
