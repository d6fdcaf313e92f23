"""The sweeper <-> job protocol: every key both sides share, and what a job's return means.

A trial's job may run in the sweeper's process or in another one (joblib, SLURM, Ray), so the two
sides meet only through Hydra overrides, one environment variable, the Optuna storage and the
MLflow store. End to end, in order:

1. The sweeper asks a trial and marks it with WORKER_HOST and WORKER_PID, so that a later start
   can fail the trial if this worker dies. It creates the study's MLflow parent run once and
   keeps its id in the study user attr PARENT_RUN_ID (a resumed sweep reopens it).
2. It launches the job with `job_env` (TRIAL_ENV, STUDY_ENV: Hydra sets them in the job's
   environment) and the storage URL in STORAGE_ENV, set by `storage_env`: not an override,
   because Hydra logs overrides and the URL may hold a password; launcher processes inherit
   it. An app whose config has a `trial` node also gets `trial_overrides` (TRIAL_NUMBER,
   TRIAL_NAME for its MLflow run, TRIAL_STUDY, TRIAL_PARENT_RUN).
3. The job (lenet_sweep.sweep.trial_link) opens that storage (where the variable did not travel, as on a
   Ray cluster's workers: its own composed `hydra.sweeper.storage`), finds its trial by number
   and rebuilds the pruner from its composed `hydra.sweeper.pruner` (Optuna does not store
   pruners). It
   writes MLFLOW_RUN_ID once its run exists, reports each epoch's objective (the pruner may stop
   it: TrialPruned) and, when done, TRAIN_TIME_S. Its MLflow run carries TAG_PARENT_RUN,
   TAG_STUDY_NAME, TAG_TRIAL_NUMBER and, at its end, TAG_TRIAL_STATE.
4. The job returns its metrics (a mapping; a number or a list of numbers from other apps) or
   raises. The sweeper turns the JobReturn into an Outcome (`job_outcome`, the values of the
   objectives it names), tells the study, and on failure writes FAIL_REASON: such a trial counts
   toward n_trials, while one failed by a dead worker, an interrupt or an outage (RERUN set too)
   is run again.
5. Repair on the next start: trials of dead workers are failed and their MLFLOW_RUN_ID runs KILLED.

A launcher gets its trials in one of three ways (lenet_sweep.sweep.dispatch, by the table
config.plugins.DISPATCH): Hydra's batches of n_jobs trials to `launch`, whose JobReturns come
back together; in flight, each trial launched alone the moment a slot frees; or streamed, to a
launcher with `stream(feed, slots, refill)` (the fused one): it asks its TrialFeed for the next
trial whenever a slot is free and hands back each TrialResult as it comes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from lenet_sweep.errors import mask_url, one_line, outage

# Overrides the sweeper gives each job (the `trial` node of the job's config).
TRIAL_PREFIX = "trial."
TRIAL_NUMBER = "trial.number"
TRIAL_NAME = "trial.name"
TRIAL_STUDY = "trial.study_name"
TRIAL_PARENT_RUN = "trial.parent_run_id"
STORAGE_ENV = "LENET_SWEEP_OPTUNA_STORAGE"  # the storage URL, for jobs in any process
# The job's trial, in its environment while it runs (Hydra's hydra.job.env_set): any app.
TRIAL_ENV, STUDY_ENV = "LENET_SWEEP_TRIAL", "LENET_SWEEP_STUDY"

# Optuna user attrs: on trials, and the one on the study.
WORKER_HOST = "worker_host"
WORKER_PID = "worker_pid"
BEAT_AT = "heartbeat_at"  # the worker's last heartbeat (time.time()), which Optuna keeps unread
MLFLOW_RUN_ID = "mlflow_run_id"
TRAIN_TIME_S = "train_time_s"  # training + evaluation, for the sweep's overhead line
FAIL_REASON = "fail_reason"
RERUN = "rerun"  # True on a FAIL that was not the trial's fault: it does not count, it runs again
PARENT_RUN_ID = "mlflow_parent_run_id"
ENQUEUED = "enqueued"  # on the study: hydra.sweeper.enqueue was done, never again
SWEEP_UID = "sweep_uid"  # on the study: what its sweep dir's .study.json names it by

# MLflow tags.
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_STUDY_NAME = "optuna.study_name"
TAG_TRIAL_NUMBER = "optuna.trial_number"
TAG_TRIAL_STATE = "optuna.trial_state"
TAG_ROLE = "lenet_sweep.role"  # "sweep" on parent runs


def trial_overrides(number: int, name: str, study_name: str, parent_run_id: str) -> list[str]:
    from lenet_sweep.sweep.search_space import format_value

    return [
        f"{TRIAL_NUMBER}={number}",
        f"{TRIAL_NAME}={format_value(name)}",
        f"{TRIAL_STUDY}={format_value(study_name)}",
        f"{TRIAL_PARENT_RUN}={parent_run_id}",
    ]


def job_env(number: int, study_name: str) -> list[str]:
    """Hydra overrides that put the trial into the job's environment, under any launcher."""
    from lenet_sweep.sweep.search_space import format_value

    return [
        f"++hydra.job.env_set.{TRIAL_ENV}={number}",
        f"++hydra.job.env_set.{STUDY_ENV}={format_value(study_name)}",
    ]


def is_trial_override(override: str) -> bool:
    return override.startswith(TRIAL_PREFIX)


@contextlib.contextmanager
def storage_env(url: str) -> Iterator[None]:
    """STORAGE_ENV = url while jobs run; the previous value (or none) afterwards."""
    previous = os.environ.get(STORAGE_ENV)
    os.environ[STORAGE_ENV] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(STORAGE_ENV, None)
        else:
            os.environ[STORAGE_ENV] = previous


@dataclass(frozen=True)
class Outcome:
    """What the study records for one job: its state, its values (COMPLETE; one per objective),
    why it failed (FAIL)."""

    state: TrialState
    values: list[float] | None = None
    reason: str | None = None
    rerun: bool = False  # FAIL by an outage (errors.Outage): not the trial's fault
    rate: float | None = None  # the job's examples/sec, unless it trained with others


class SlotCounts(Protocol):
    """How busy a group's slots were (lenet_sweep.fused.trainer.Occupancy): epochs trained by
    live trials of the slot-epochs, and of those the group's tail (nothing left to refill)."""

    live_epochs: int
    slot_epochs: int
    tail_live: int
    tail_slots: int


@dataclass(frozen=True)
class GroupShare:
    """A trial trained with others as one group: the group's id and its counts so far."""

    group_id: str
    counts: SlotCounts


@dataclass(frozen=True)
class TrialResult:
    """What a launcher hands back for one trial: its number (its job's idx), Hydra's JobReturn,
    and, from a fused group, the group it trained in."""

    number: int
    ret: JobReturn
    group: GroupShare | None = None


class TrialFeed(Protocol):
    """The sweeper's side of a streaming launch: one trial at a time, asked from the study under
    its ask lock (so the sampler sees every result told before), each result told as it comes."""

    def next_job(self) -> tuple[int, list[str]] | None:
        """The next trial's number (its job's idx) and overrides; None: nothing left to ask."""

    def finished(self, result: TrialResult) -> None:
        """A trial's result: its trial is told now (an outage raises errors.Outage)."""


def job_outcome(ret: JobReturn, objectives: list[str], alone: bool = True) -> Outcome:
    """Finite values of the objectives -> COMPLETE; TrialPruned -> PRUNED; else FAIL, with why.
    `alone`: the job trained by itself (its examples/sec is its own, not a group's).

    A job returns a mapping of metrics (the objectives are looked up by name), or, from an app
    that knows the objectives itself, one number or a list of numbers in their order.
    """
    if ret.status != JobStatus.COMPLETED:
        error = job_exception(ret)
        if isinstance(error, optuna.TrialPruned):
            return Outcome(TrialState.PRUNED, reason=str(error) or None)
        if down := outage(error):
            return Outcome(TrialState.FAIL, reason=one_line(down), rerun=True)
        return _failed(error)
    returned = ret.return_value
    try:
        if isinstance(returned, Mapping):
            values = [float(returned[name]) for name in objectives]
        else:
            values = [
                float(v) for v in (returned if isinstance(returned, Sequence) else [returned])
            ]
    except (KeyError, TypeError, ValueError):
        return _failed(ValueError(f"job returned {returned!r}, not values for {objectives}"))
    if len(values) != len(objectives) or not all(math.isfinite(v) for v in values):
        return _failed(ValueError(f"job returned {_shown(values)} for {objectives}"))
    rate = returned.get("examples_per_sec") if isinstance(returned, Mapping) else None
    return Outcome(TrialState.COMPLETE, values=values, rate=rate if alone else None)


def _shown(values: list[float]) -> str:
    return str(values[0]) if len(values) == 1 else str(values)


def job_exception(ret: JobReturn) -> BaseException:
    """The exception a failed job raised.

    Private API: Hydra's public JobReturn.return_value re-raises a failed job's exception after
    printing "Error executing job ..." (facebookresearch/hydra#1465, the partial-failure design
    of #1377); the exception alone is only in `_return_value`. It can go when JobReturn exposes
    the exception without raising it.
    """
    return ret._return_value


def _failed(error: BaseException) -> Outcome:
    return Outcome(TrialState.FAIL, reason=f"{type(error).__name__}: {mask_url(str(error))}"[:500])
