"""The sweep's answer: once its study is done, the best trial's configuration trained again (the
app's `refit_overrides`: lenet_sweep's, on all the training images with `refit_seeds` fresh
seeds side by side) through the sweep's own launcher (fused where it is fused), and tested.

The answer is kept in the study (its user attr `refit`), so a rerun of a finished study prints it
again without training; a refit killed before it ends left nothing there and runs again. A refit
that fails says so in one line and leaves the sweep's results as they are.
"""

from __future__ import annotations

import logging
import time

from hydra.core.utils import JobStatus

from lenet_sweep.errors import Outage, first_line, outage
from lenet_sweep.sweep import protocol

log = logging.getLogger("lenet_sweep.sweep")
REFIT = "refit"  # the study's user attr: the answer, once it exists


def answer(sweep, study, best, record, started: float) -> dict | None:
    """The answer for `best` (the study's best trial): kept, or refit now; None when there is
    none to give (refit off, several objectives, an app that does not refit)."""
    seeds, overrides = sweep.settings.refit_seeds, None
    if seeds and len(sweep.directions) == 1:
        overrides = sweep.app.refit_overrides(best, seeds, record)
    if overrides is not None:
        overrides = sweep.trial_params(best) + overrides
    if overrides is None:
        return None
    kept = study.user_attrs.get(REFIT)
    if kept and kept.get("trial") == best.number and kept.get("seeds") == seeds:
        log.info("answer (kept from the study's refit): %s", shown(kept))
        return kept
    log.info("refit of trial %d: %d fresh seeds, all the training images", best.number, seeds)
    try:
        got = _refit(sweep, best, overrides, seeds, started)
    except Outage:
        raise
    except Exception as e:  # noqa: BLE001 - the sweep's results stand; the answer says why not
        if down := outage(e):
            raise down from e
        got = {"trial": best.number, "error": f"{type(e).__name__}: {first_line(e, 300)}"}
        why = f"refit of trial {best.number} failed: {got['error']}"
        log.warning("%s; the sweep's results stand", why)
        return got
    study.set_user_attr(REFIT, got)
    log.info("answer: %s", shown(got))
    return got


def _refit(sweep, best, overrides: list[str], seeds: int, started: float) -> dict:
    with protocol.storage_env(sweep.settings.storage):
        [ret] = sweep.launcher.launch([overrides], initial_job_idx=sweep.settings.n_trials)
    if ret.status != JobStatus.COMPLETED:
        raise protocol.job_exception(ret)
    metric, returned = sweep.app.refit_metric, ret.return_value
    return {
        "trial": best.number,
        "params": dict(best.params),
        "seeds": seeds,
        metric: float(returned[metric]),
        f"{metric}_std": float(returned.get(f"{metric}_std", 0.0)),
        "metric": metric,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def shown(got: dict) -> str:
    """`lr=0.9 epochs=10: test_acc 0.8123 ± 0.0041 over 3 seeds, 83.2 s from the sweep's start`."""
    metric = got["metric"]
    params = " ".join(f"{k}={_short(v)}" for k, v in got["params"].items())
    return (
        f"{params}: {metric} {got[metric]:.4f} ± {got[f'{metric}_std']:.4f} over "
        f"{got['seeds']} seeds, {got['wall_s']:.1f} s from the sweep's start"
    )


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
