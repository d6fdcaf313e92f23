"""A sweep's trials between the study and the launcher: asked (under the ask lock, so several
workers never overshoot n_trials), given their jobs' overrides, told their jobs' outcomes. Hydra's
batches go through `ask` and `tell`; a streaming launcher through `next_job` and `finished`
(protocol.TrialFeed), one trial at a time."""

from __future__ import annotations

import logging
import os

import optuna
from hydra.utils import get_method
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lenet_sweep import signals
from lenet_sweep.config.identity import setting
from lenet_sweep.errors import Outage
from lenet_sweep.process import HOST
from lenet_sweep.sweep import protocol, report, search_space, study_db

log = logging.getLogger("lenet_sweep.sweep")
_ABSENT = object()


def trial_name(number: int, params: dict) -> str:
    """`t003 lr=0.0826 ep=12`: short enough to read in the MLflow UI's runs table."""
    return " ".join([f"t{number:03d}", *(setting(k, v) for k, v in params.items())])


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
    """One sweep process's trials in flight: what it asked and has not told yet."""

    def __init__(self, sweep, study, storage, space, fixed, parent_run_id, heartbeat) -> None:
        self.settings, self.config, self.objectives = sweep.settings, sweep.config, sweep.objectives
        self.groups = sweep.groups  # fused: group id -> its Occupancy
        self.study, self.storage, self.space, self.fixed = study, storage, space, fixed
        self.parent_run_id, self.heartbeat = parent_run_id, heartbeat
        self.in_flight: dict[int, optuna.Trial] = {}
        self.states: list[TrialState] = []
        self.stopped = False  # failures passed max_failure_rate: ask no more

    def next_job(self) -> tuple[int, list[str]] | None:
        if self.stopped or signals.pending():
            return None
        asked = self.ask(1)
        return asked[0] if asked else None

    def finished(self, idx: int, ret) -> None:
        self.tell([idx], [ret])

    def ask(self, n: int) -> list[tuple[int, list[str]]]:
        """Up to n new trials (fewer when the budget is nearly spent): (number, overrides)."""
        with study_db.ask_lock(self.storage, self.settings.storage):
            left = self.settings.n_trials - study_db.budget_used(self.study)
            with study_db.heartbeat_warnings_off():
                trials = [self.study.ask() for _ in range(max(0, min(n, left)))]
            for trial in trials:  # the pid first: a trial of this host is judged by its pid
                trial.set_user_attr(protocol.WORKER_PID, os.getpid())
                trial.set_user_attr(protocol.WORKER_HOST, HOST)
        self.in_flight.update((t.number, t) for t in trials)
        self.heartbeat.add(trials)
        asked = [(t.number, self._overrides(t)) for t in trials]
        for trial in trials:
            log.info("trial %d started: %s", trial.number, _shown(trial.params))
        return asked

    def tell(self, numbers: list[int], returns: list) -> None:
        """The jobs' outcomes into their trials; a trial an outage hit runs again, and stops the
        sweep (errors.Outage)."""
        trials = [self.in_flight.pop(n) for n in numbers]
        for n in numbers:
            self.heartbeat.drop(n)
        for ret in returns:  # fused groups: how busy their slots were
            if group := getattr(ret, protocol.TRAINED_TOGETHER, None):
                self.groups[group[0]] = group[1]
        outcomes = [protocol.job_outcome(r, self.objectives) for r in returns]
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
            self.stopped = self.stopped or report.too_many_failures(self.study, self.settings)

    def _overrides(self, trial: optuna.Trial) -> list[str]:
        for name, dist in self.space.items():
            search_space.suggest(trial, name, dist)
        if self.settings.custom_search_space:
            get_method(self.settings.custom_search_space)(self.config, trial)
        overrides = [
            f"{self._key(k)}={search_space.format_value(v)}" for k, v in trial.params.items()
        ]
        overrides += [f"{k}={v}" for k, v in self.fixed.items() if k not in trial.params]
        overrides += protocol.job_env(trial.number, trial.study.study_name)
        if "trial" in self.config:  # an app with a trial node gets its MLflow bookkeeping too
            name = trial_name(trial.number, trial.params)
            overrides += protocol.trial_overrides(
                trial.number, name, trial.study.study_name, self.parent_run_id
            )
        return overrides

    def _key(self, key: str) -> str:
        """`+key` for a parameter the app's config lacks (one a custom search space added)."""
        missing = OmegaConf.select(self.config, key, default=_ABSENT) is _ABSENT
        return f"+{key}" if missing else key
