"""A sweep's trials between the study and the launcher: asked (under the ask lock, so several
workers never overshoot n_trials), given their jobs' overrides, told their jobs' outcomes, one
trial at a time or a batch at once (protocol.TrialFeed: `next_job`, `finished`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from lenet_sweep import signals
from lenet_sweep.errors import Outage
from lenet_sweep.process import HOST
from lenet_sweep.sweep import protocol, report, study_db

log = logging.getLogger("lenet_sweep.sweep")


def _shown(params: dict) -> str:
    return " ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in params.items())


def record(study: optuna.Study, trial: optuna.Trial, outcome: protocol.Outcome) -> TrialState:
    """Store one job's outcome in its trial; returns the trial's state."""
    if outcome.state == TrialState.FAIL:
        trial.set_user_attr(protocol.FAIL_REASON, outcome.reason)
        log.warning("trial %d failed: %s", trial.number, outcome.reason)
    elif outcome.state == TrialState.PRUNED:
        log.info("trial %d pruned (%s)", trial.number, outcome.reason)
    study_db.tell(study, trial, values=outcome.values, state=outcome.state)
    return outcome.state


class StudyFeed:
    """One sweep process's trials in flight: what it asked and has not told yet. `overrides(trial)`
    gives a trial's job overrides (the sweep's search space, fixed values, the app's additions);
    `budget`: n_trials, max_failure_rate and the storage URL (for the ask lock)."""

    def __init__(self, study, storage, heartbeat, overrides: Callable, objectives, budget) -> None:
        self.study, self.storage, self.heartbeat = study, storage, heartbeat
        self.overrides, self.objectives, self.budget = overrides, objectives, budget
        self.in_flight: dict[int, optuna.Trial] = {}
        self.states: list[TrialState] = []
        self.groups: dict[str, protocol.SlotCounts] = {}  # fused: group id -> its slot counts
        self.stopped = False  # failures passed max_failure_rate: ask no more

    def next_job(self) -> tuple[int, list[str]] | None:
        if self.stopped or signals.pending():
            return None
        asked = self.ask(1)
        return asked[0] if asked else None

    def finished(self, result: protocol.TrialResult) -> None:
        self.tell([result])

    def ask(self, n: int) -> list[tuple[int, list[str]]]:
        """Up to n new trials (fewer when the budget is nearly spent): (number, overrides)."""
        with study_db.ask_lock(self.storage, self.budget.storage):
            left = self.budget.n_trials - study_db.budget_used(self.study)
            with study_db.heartbeat_warnings_off():
                trials = [self.study.ask() for _ in range(max(0, min(n, left)))]
            for trial in trials:  # the pid first: a trial of this host is judged by its pid
                trial.set_user_attr(protocol.WORKER_PID, os.getpid())
                trial.set_user_attr(protocol.WORKER_HOST, HOST)
        self.in_flight.update((t.number, t) for t in trials)
        self.heartbeat.add(trials)
        asked = [(t.number, self.overrides(t)) for t in trials]
        for trial in trials:
            log.info("trial %d started: %s", trial.number, _shown(trial.params))
        return asked

    def tell(self, results: list[protocol.TrialResult]) -> None:
        """The jobs' outcomes into their trials; a trial an outage hit runs again, and stops the
        sweep (errors.Outage)."""
        trials = [self.in_flight.pop(r.number) for r in results]
        for r in results:
            self.heartbeat.drop(r.number)
            if r.group is not None:  # fused groups: how busy their slots were
                self.groups[r.group.group_id] = r.group.counts
        outcomes = [
            protocol.job_outcome(r.ret, self.objectives, alone=r.group is None) for r in results
        ]
        down = [(t, o) for t, o in zip(trials, outcomes, strict=True) if o.rerun]
        for trial, outcome in down:
            study_db.fail_for_rerun(self.study, self.storage, trial.number, outcome.reason)
        told = [(t, o) for t, o in zip(trials, outcomes, strict=True) if not o.rerun]
        self.states += [record(self.study, t, o) for t, o in told]
        report.log_progress(self.study, [t for t, _ in told], [o for _, o in told], self.objectives)
        if down:
            trial, outcome = down[0]
            raise Outage(f"trial {trial.number} stopped, to run again: {outcome.reason}")
        if any(o.state == TrialState.FAIL for _, o in told):  # the study is read on a failure only
            self.stopped = self.stopped or report.too_many_failures(self.study, self.budget)
