"""The sweep loop: ask a batch of trials, launch it through Hydra's launcher, tell the results.

What the official hydra-optuna-sweeper lacks and this adds: n_trials is the study's total (a
rerun finishes what is left), dead workers' trials are failed first, pruning reaches jobs in
other processes, NaN/inf/raising jobs fail only their trial, several workers share one study
without overshooting n_trials (lenet_sweep.study_storage), and the sweep is one MLflow parent
run with a child run per trial (lenet_sweep.tracking). Jobs and sweeper meet through
lenet_sweep.protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

import optuna
import yaml
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.lenet_sweep_optuna.config import LenetOptunaSweeperConf
from lenet_sweep import (
    painter,
    protocol,
    search_space,
    signals,
    study_storage,
    sweep_report,
    tracking,
    tracking_store,
)
from lenet_sweep.errors import EXIT_SWEEP_FAILED, UserError
from lenet_sweep.sweep_report import values
from lenet_sweep.sweep_setup import SweepSetup
from lenet_sweep.tracking import NoSweepRun, SweepRun
from lenet_sweep.urls import mask_url

log = logging.getLogger("lenet_sweep.sweep")


class SweepFailed(UserError):
    """The sweep ran but its trials failed (no trial completed, or too many failed)."""

    exit_code = EXIT_SWEEP_FAILED


_ABSENT = object()
_SHORT = {"epochs": "ep", "batch_size": "bs"}  # in trial names, which the MLflow UI cuts


def record(study: optuna.Study, trial: optuna.Trial, outcome: protocol.Outcome) -> TrialState:
    """Store one job's outcome in its trial; returns the trial's state."""
    if outcome.state == TrialState.FAIL:
        trial.set_user_attr(protocol.FAIL_REASON, outcome.reason)
        log.warning("trial %d failed: %s", trial.number, outcome.reason)
    elif outcome.state == TrialState.PRUNED:
        log.info("trial %d pruned (%s)", trial.number, outcome.reason)
    study_storage.tell(study, trial, values=outcome.values, state=outcome.state)
    return outcome.state


def trial_name(number: int, params: dict) -> str:
    """`t003 lr=0.0826 ep=12`: short enough to read in the MLflow UI's runs table."""
    shown = (f"{_SHORT.get(k, k)}={f'{v:.3g}' if isinstance(v, float) else v}"
             for k, v in params.items())  # fmt: skip
    return " ".join([f"t{number:03d}", *shown])


class OptunaSweep:
    """One sweep process: settings + Hydra's composed config + a launcher."""

    def __init__(self, settings: LenetOptunaSweeperConf, config: DictConfig, launcher,
                 group_options: Callable[[str], list[str]]):  # fmt: skip
        self.settings, self.config, self.launcher = settings, config, launcher
        self.setup = SweepSetup(settings, config, group_options)
        self.directions, self.objectives = self.setup.directions, self.setup.objectives
        self.sweep_dir = self.setup.sweep_dir
        self.mlflow_uri = None
        if settings.mlflow:  # the app's `mlflow` node says where (lenet_sweep's config has one)
            self.mlflow_uri = tracking_store.resolve_tracking_uri(config.mlflow.tracking_uri)

    def run(self, arguments: list[str]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._run(arguments)
        except MlflowException as e:  # the tracking server went away (or never came)
            first = mask_url(str(e)).splitlines()[0][:300]
            raise SweepFailed(f"MLflow at {mask_url(str(self.mlflow_uri))} failed: {first}; start "
                              "the tracking server (or fix MLFLOW_TRACKING_URI) and rerun the "
                              "same command: the study goes on") from e  # fmt: skip

    def _run(self, arguments: list[str]) -> None:
        settings = self.settings
        if self.mlflow_uri:  # the parent run's plots: their imports in the helper meanwhile
            painter.start(study_plots=True)
        space, fixed = self.setup.check(arguments)
        sampler = self.setup.sampler(space)
        if self.mlflow_uri:
            experiment_id = tracking_store.prepare_experiment(
                self.mlflow_uri, self.config.mlflow.experiment
            )
        storage = study_storage.open_storage(
            settings.storage, settings.heartbeat_interval, settings.grace_period
        )
        study = self.setup.open_study(storage, sampler)
        dead = study_storage.fail_dead_workers(study)
        if self.mlflow_uri:
            tracking.kill_trial_runs(self.mlflow_uri, dead)
        log.info("study %s in %s: %d/%d trials done, sampler %s, search space %s",
                 study.study_name, mask_url(settings.storage), study_storage.budget_used(study),
                 settings.n_trials, type(sampler).__name__,
                 {k: repr(v) for k, v in space.items()})  # fmt: skip
        with study_storage.ask_lock(storage, settings.storage):
            parent = NoSweepRun() if not self.mlflow_uri else SweepRun.open(
                self.mlflow_uri, experiment_id, study, {
                "study_name": study.study_name, "storage": settings.storage,
                "sampler": type(sampler).__name__, "pruner": type(self.setup.pruner()).__name__,
                "direction": self.directions, "objectives": self.objectives,
                "n_trials": settings.n_trials,
                "search_space": {k: repr(v) for k, v in space.items()},
            })  # fmt: skip
            self.setup.enqueue(study)
        parent.set_tags({"sweep_dir": self.sweep_dir})
        started = time.perf_counter()
        with protocol.storage_env(settings.storage):
            states = self._loop(study, storage, space, fixed, parent)
        self._finish(study, parent, states, time.perf_counter() - started)

    # --- the loop ------------------------------------------------------------------------
    def _loop(self, study, storage, space, fixed, parent: SweepRun) -> list[TrialState]:
        """Ask, launch, tell until the budget is spent, failures pass the rate, or a signal."""
        heartbeat = study_storage.Heartbeat(
            storage, study.study_name, self.settings.heartbeat_interval
        )
        heartbeat.start()
        states: list[TrialState] = []
        in_flight: list[optuna.Trial] = []
        lost = 0  # trials whose job process died (killed, out of memory, node lost)
        try:
            with signals.stop_on_signals():
                while not signals.check() and (in_flight := self._ask(study, storage)):
                    heartbeat.watch(in_flight)
                    overrides = [self._overrides(t, space, fixed, parent.run_id) for t in in_flight]
                    try:
                        returns = self.launcher.launch(
                            overrides, initial_job_idx=in_flight[0].number
                        )
                    except Exception as e:  # noqa: BLE001 - a launcher reports a dead job so
                        lost += self._batch_lost(study, in_flight, e)
                        heartbeat.watch([])
                        if lost / self.settings.n_trials > self.settings.max_failure_rate:
                            raise SweepFailed(f"{lost} trials lost with their job processes, "
                                              f"last: {type(e).__name__}: {mask_url(str(e))[:300]}; "
                                              "see the launcher's job logs") from e  # fmt: skip
                        continue
                    outcomes = [protocol.job_outcome(r, self.objectives) for r in returns]
                    for trial, outcome in zip(in_flight, outcomes, strict=True):
                        states.append(record(study, trial, outcome))
                    self._log_progress(study, in_flight, outcomes)
                    heartbeat.watch([])
                    if self._too_many_failures(study):
                        break
        except BaseException:
            # Interrupted: fail this worker's in-flight trials (they run again on the next start).
            for trial in in_flight:
                with contextlib.suppress(Exception):
                    study_storage.tell(study, trial, state=TrialState.FAIL)
            with contextlib.suppress(Exception):
                parent.end("KILLED")
            raise
        finally:
            heartbeat.stopped.set()
        return states

    def _batch_lost(self, study, in_flight: list[optuna.Trial], error: Exception) -> int:
        """A job process died (submitit and Ray raise for the whole batch): fail the batch's
        trials without a fail_reason, so that new trials replace them, and end their MLflow runs
        KILLED. Returns how many were lost."""
        log.warning("a job of trials %s died (%s: %s); failing the batch, its trials run again",
                    [t.number for t in in_flight], type(error).__name__,
                    mask_url(str(error)).splitlines()[0][:300] if str(error) else "")  # fmt: skip
        for trial in in_flight:
            study_storage.tell(study, trial, state=TrialState.FAIL)
        if self.mlflow_uri:
            numbers = {t.number for t in in_flight}
            lost = [t for t in study.get_trials(deepcopy=False) if t.number in numbers]
            tracking.kill_trial_runs(self.mlflow_uri, lost)
        return len(in_flight)

    def _ask(self, study, storage) -> list[optuna.Trial]:
        with study_storage.ask_lock(storage, self.settings.storage):
            left = self.settings.n_trials - study_storage.budget_used(study)
            trials = [study.ask() for _ in range(max(0, min(self.settings.n_jobs, left)))]
            for trial in trials:
                trial.set_user_attr(protocol.WORKER_HOST, tracking_store.HOST)
                trial.set_user_attr(protocol.WORKER_PID, os.getpid())
        return trials

    def _overrides(self, trial, space, fixed, parent_run_id) -> list[str]:
        for name, dist in space.items():
            search_space.suggest(trial, name, dist)
        if self.settings.custom_search_space:
            get_method(self.settings.custom_search_space)(self.config, trial)
        overrides = [
            f"{self._key(k)}={search_space.format_value(v)}" for k, v in trial.params.items()
        ]
        overrides += [f"{k}={v}" for k, v in fixed.items() if k not in trial.params]
        overrides += protocol.job_env(trial.number, trial.study.study_name)
        if "trial" in self.config:  # an app with a trial node gets its MLflow bookkeeping too
            name = trial_name(trial.number, trial.params)
            overrides += protocol.trial_overrides(trial.number, name, trial.study.study_name,
                                                  parent_run_id)  # fmt: skip
        return overrides

    def _key(self, key: str) -> str:
        """`+key` for a parameter the app's config lacks (one a custom search space added)."""
        missing = OmegaConf.select(self.config, key, default=_ABSENT) is _ABSENT
        return f"+{key}" if missing else key

    def _log_progress(self, study, batch: list, outcomes: list[protocol.Outcome]) -> None:
        """One line per completed trial of a batch, with the best after it (the Pareto front:
        several); the study read once per batch, not once per trial (64 a fused batch)."""
        completed = [t for t, o in zip(batch, outcomes, strict=True)
                     if o.state == TrialState.COMPLETE]  # fmt: skip
        if not completed:
            return
        trials = study.get_trials(deepcopy=False)
        if len(self.directions) == 1:
            best = study.best_trial
            so_far = f"best so far: trial {best.number}, {values(best, self.objectives)}"
        else:
            so_far = f"Pareto front: trials {', '.join(str(t.number) for t in study.best_trials)}"
        for trial in completed:
            done = trials[trial.number]
            log.info("trial %d done: %s; %s", trial.number, values(done, self.objectives), so_far)

    def _too_many_failures(self, study: optuna.Study) -> bool:
        """Failures measured against n_trials: once past the rate, the sweep can only end past it."""
        failed = study_storage.job_failures(study)
        return failed / self.settings.n_trials > self.settings.max_failure_rate

    # --- results -------------------------------------------------------------------------
    def _finish(self, study, parent: SweepRun, states, elapsed) -> None:
        """Results file, best trial on the parent run, its end status, the summary lines."""
        trials = study.get_trials(deepcopy=False)
        counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
        summary = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
        ran = f"{len(states)} trial(s) run here in {elapsed:.1f}s"
        if not counts["COMPLETE"]:
            parent.end("FAILED")
            failed = [t for t in trials if protocol.FAIL_REASON in t.user_attrs]
            last = (
                f"; last failure: {failed[-1].user_attrs[protocol.FAIL_REASON]}" if failed else ""
            )
            raise SweepFailed(
                f"sweep {study.study_name}: no trial completed ({summary}; {ran}{last}); "
                "see the trials' fail_reason in Optuna or the child runs' error tag in MLflow"
            )
        best = [study.best_trial] if len(self.directions) == 1 else study.best_trials
        results = sweep_report.results(best, self.directions, self.objectives)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results))
        parent.record_best(study, best, results, self.objectives)
        too_many = self._too_many_failures(study)
        if too_many:
            parent.end("FAILED")
        elif not counts["RUNNING"]:  # another worker still running: it will end the parent run
            parent.end("FINISHED")
        log.info("sweep %s: %s; %s", study.study_name, summary, ran)
        sweep_report.log_overhead(trials, elapsed)
        for trial in best:
            log.info("%s trial %d: %s with %s", "best" if len(self.objectives) == 1 else "Pareto-optimal",
                     trial.number, values(trial, self.objectives),
                     " ".join(f"{k}={v}" for k, v in trial.params.items()))  # fmt: skip
        log.info("results: %s", self.sweep_dir / "optimization_results.yaml")
        if self.mlflow_uri:
            log.info("MLflow: %s", tracking_store.ui_link(self.mlflow_uri, parent.experiment_id))
        if too_many:
            raise SweepFailed(
                f"sweep {study.study_name}: {study_storage.job_failures(study)} of "
                f"{self.settings.n_trials} trials failed, more than max_failure_rate="
                f"{self.settings.max_failure_rate}; fix the failing trials (fail_reason in "
                "Optuna) or raise hydra.sweeper.max_failure_rate"
            )
