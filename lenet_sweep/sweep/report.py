"""A sweep's report: its progress lines, the results file in the official sweeper's shape, the
best trial on the parent run, and its closing lines (or why it failed)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import yaml
from optuna.trial import TrialState

from lenet_sweep.errors import EXIT_SWEEP_FAILED, UserError
from lenet_sweep.process import HOST
from lenet_sweep.sweep import protocol, refit, study_db

log = logging.getLogger("lenet_sweep.sweep")


class SweepFailed(UserError):
    """The sweep ran but its trials failed (no trial completed, or too many failed)."""

    exit_code = EXIT_SWEEP_FAILED


def values(trial, objectives: list[str]) -> str:
    return " ".join(
        f"{name}={value:.4g}" for name, value in zip(objectives, trial.values, strict=True)
    )


def results(best: list, directions: list[str], objectives: list[str]) -> dict:
    """optimization_results.yaml, in the official sweeper's shape (solutions: several)."""
    if len(directions) == 1:
        return {"name": "optuna", "best_params": dict(best[0].params), "best_value": best[0].value}
    solutions = [
        {"number": t.number, "params": dict(t.params), "values": list(t.values)} for t in best
    ]
    return {
        "name": "optuna",
        "objectives": dict(zip(objectives, directions, strict=True)),
        "solutions": solutions,
    }


def log_overhead(trials, elapsed: float) -> None:
    here = [t for t in trials if t.user_attrs.get(protocol.WORKER_PID) == os.getpid()]
    busy = sum(t.user_attrs.get(protocol.TRAIN_TIME_S, 0.0) for t in here)
    if not (here and busy):
        return
    if busy > elapsed:  # trials trained side by side (hydra/launcher=fused)
        log.info(
            "training + evaluation: %.1f trial-seconds in %.1fs of sweep (trials trained together)",
            busy,
            elapsed,
        )
        return
    log.info(
        "time in training + evaluation: %.1fs of %.1fs; overhead %.2fs per trial "
        "(Hydra, Optuna, MLflow, data loading)",
        busy,
        elapsed,
        (elapsed - busy) / len(here),
    )


def log_occupancy(groups: dict, parent) -> None:
    """Fused groups (their Occupancy): the share of their slot-epochs that trained a live trial,
    on the parent run as `slot_occupancy`, and until the last trial was asked (before the
    groups' tails) as `slot_occupancy_asking`."""
    live, slots = (
        sum(g.live_epochs for g in groups.values()),
        sum(g.slot_epochs for g in groups.values()),
    )
    tail_live = sum(g.tail_live for g in groups.values())
    tail_slots = sum(g.tail_slots for g in groups.values())
    if not slots:
        return
    asking = (live - tail_live) / (slots - tail_slots) if slots > tail_slots else 1.0
    parent.log_metrics({"slot_occupancy": live / slots, "slot_occupancy_asking": asking})
    until = f"; {100 * asking:.0f} % until the last trial was asked" if tail_slots else ""
    share = f"{100 * live / slots:.0f} %{until}"
    log.info("fused slots: %d of %d slot-epochs trained a live trial (%s)", live, slots, share)


_WORKERS = ".workers"  # in the sweep dir: each fused worker's group counts, for its driver
_COUNTS = ("live_epochs", "slot_epochs", "tail_live", "tail_slots")


def save_worker_groups(sweep_dir, groups: dict) -> None:
    """A fused worker's groups' slot counts, for its driver's closing lines."""
    folder = Path(sweep_dir) / _WORKERS
    folder.mkdir(parents=True, exist_ok=True)
    counts = {gid: {k: getattr(g, k) for k in _COUNTS} for gid, g in groups.items()}
    (folder / f"{HOST}-{os.getpid()}.json").write_text(json.dumps(counts))


def worker_groups(sweep_dir) -> dict:
    """The slot counts its workers left (their files then removed): a multi-device sweep closes
    with the same occupancy lines and metrics as one device."""
    folder, found = Path(sweep_dir) / _WORKERS, {}
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        found.update((g, SimpleNamespace(**c)) for g, c in json.loads(file.read_text()).items())
        file.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return found


def log_progress(study, batch: list, outcomes: list, objectives: list[str]) -> None:
    """One line per completed trial of a batch, with the best after it (the Pareto front:
    several); the study read once per batch, not once per trial (64 a fused batch)."""
    completed = [t for t, o in zip(batch, outcomes, strict=True) if o.state == TrialState.COMPLETE]
    if not completed:
        return
    trials = study.get_trials(deepcopy=False)
    if len(study.directions) == 1:
        best = study.best_trial
        so_far = f"best so far: trial {best.number}, {values(best, objectives)}"
    else:
        so_far = f"Pareto front: trials {', '.join(str(t.number) for t in study.best_trials)}"
    for trial, outcome in zip(batch, outcomes, strict=True):
        if outcome.state == TrialState.COMPLETE:
            done = values(trials[trial.number], objectives)
            rate = f", {outcome.rate:,.0f} examples/sec" if outcome.rate else ""
            log.info("trial %d done: %s%s; %s", trial.number, done, rate, so_far)


def too_many_failures(study, settings) -> bool:
    """Failures measured against n_trials: once past the rate, the sweep can only end past it."""
    return len(study_db.job_failures(study)) / settings.n_trials > settings.max_failure_rate


def finish(sweep, study, parent, ran_here: int, started: float, groups: dict) -> None:
    """Results file, best trial on the record (the app's), the answer (the best refit over
    fresh seeds, lenet_sweep.sweep.refit), the record's end status, the summary lines (`groups`:
    the fused groups' slot counts, this process's and its workers')."""
    elapsed = time.perf_counter() - started
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
    summary = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
    ran = f"{ran_here} trial(s) run here in {elapsed:.1f}s"
    if not counts["COMPLETE"]:
        parent.end("FAILED")
        raise _none_completed(study, f"{summary}; {ran}")
    best = [study.best_trial] if len(sweep.directions) == 1 else study.best_trials
    results_file = sweep.sweep_dir / "optimization_results.yaml"
    results_ = results(best, sweep.directions, sweep.objectives)
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    results_file.write_text(yaml.safe_dump(results_))  # first without the answer: it may fail
    too_many = too_many_failures(study, sweep.settings)
    if not too_many and (got := refit.answer(sweep, study, best[0], parent, started)):
        results_["refit"] = got
        results_file.write_text(yaml.safe_dump(results_))
        if "error" not in got:
            metric = got["metric"]
            answer = {f"refit_{metric}": got[metric], f"refit_{metric}_std": got[f"{metric}_std"]}
            parent.log_metrics({**answer, "answer_s": got["wall_s"]})
    sweep.app.finish(parent, study, best, results_, sweep.objectives)
    if too_many:
        parent.end("FAILED")
    elif not counts["RUNNING"]:  # another worker still running: it will end the parent run
        parent.end("FINISHED")
    log.info("sweep %s: %s; %s", study.study_name, summary, ran)
    log_overhead(trials, elapsed)
    log_occupancy(groups, parent)
    kind = "best" if len(sweep.objectives) == 1 else "Pareto-optimal"
    for trial in best:
        shown = " ".join(f"{k}={v}" for k, v in trial.params.items())
        log.info(
            "%s trial %d: %s with %s", kind, trial.number, values(trial, sweep.objectives), shown
        )
    log.info("results: %s", results_file)
    if too_many:
        raise SweepFailed(
            f"sweep {study.study_name}: {len(study_db.job_failures(study))} of "
            f"{sweep.settings.n_trials} trials failed, more than max_failure_rate="
            f"{sweep.settings.max_failure_rate}; fix the failing trials (fail_reason in "
            "Optuna) or raise hydra.sweeper.max_failure_rate"
        )


def _none_completed(study, counted: str) -> SweepFailed:
    failed = study_db.job_failures(study)
    last = f"; last failure: {failed[-1].user_attrs[protocol.FAIL_REASON]}" if failed else ""
    return SweepFailed(
        f"sweep {study.study_name}: no trial completed ({counted}{last}); "
        "see the trials' fail_reason in Optuna or the child runs' error tag in MLflow"
    )
