"""The sweep loop: ask a batch of trials, launch it through Hydra's launcher, tell the results.

What the official hydra-optuna-sweeper lacks and this adds: n_trials is the study's total (a
rerun finishes what is left), dead workers' trials are failed first, pruning reaches jobs in
other processes, NaN/inf/raising jobs fail only their trial, several workers share one study
without overshooting n_trials (lenet_sweep.sweep.study_db), and the sweep is one MLflow parent
run with a child run per trial (lenet_sweep.sweep.parent_run). Jobs and sweeper meet through
lenet_sweep.sweep.protocol.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent import futures

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from lenet_sweep import signals
from lenet_sweep.config.plugins import LenetOptunaSweeperConf
from lenet_sweep.db_files import store_file
from lenet_sweep.errors import Outage, first_line, mask_url, one_line, outage
from lenet_sweep.process import ROLE
from lenet_sweep.sweep import in_flight, protocol, report, search_space, study_db
from lenet_sweep.sweep.feed import StudyFeed
from lenet_sweep.sweep.parent_run import NoSweepRun, SweepRun, kill_trial_runs
from lenet_sweep.sweep.report import SweepFailed
from lenet_sweep.sweep.setup import SweepSetup
from lenet_sweep.tracking import backend as tracking_backend

log = logging.getLogger("lenet_sweep.sweep")
# Hydra's launchers log each job's overrides, the protocol's internals among them (trial.*,
# env_set): the sweep logs each trial's number and params instead.
_LAUNCHER_LOGS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
    "hydra_plugins.hydra_ray_launcher._core",
    "hydra_plugins.hydra_joblib_launcher._core",
)


def _one_log_format() -> None:
    """Optuna's INFO lines off and its warnings (and Python's) through the app's handlers, in the
    app's format; the launchers' job lines off."""
    logging.captureWarnings(True)  # Python warnings (Optuna's plots') as timed log lines
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    for name in _LAUNCHER_LOGS:
        logging.getLogger(name).setLevel(logging.WARNING)


class OptunaSweep:
    """One sweep process: settings + Hydra's composed config + a launcher."""

    def __init__(
        self,
        settings: LenetOptunaSweeperConf,
        config: DictConfig,
        launcher,
        group_options: Callable[[str], list[str]],
    ):
        self.settings, self.config, self.launcher = settings, config, launcher
        _one_log_format()
        self.setup = SweepSetup(settings, config, group_options)
        self.directions, self.objectives = self.setup.directions, self.setup.objectives
        self.sweep_dir = self.setup.sweep_dir
        self.mlflow_uri = None
        self.groups: dict[str, object] = {}  # fused: group id -> its Occupancy
        if settings.mlflow:  # the app's `mlflow` node says where (lenet_sweep's config has one)
            self.mlflow_uri = tracking_backend.resolve_tracking_uri(config.mlflow.tracking_uri)

    def run(self, arguments: list[str]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._run(arguments)
        except Outage:
            raise
        except Exception as e:
            where = store_file(e, self.mlflow_uri, self.settings.storage)
            if down := outage(e, where):  # a store this process talks to went away, or is full
                raise down from e
            if not isinstance(e, MlflowException):
                raise
            first = mask_url(str(e)).splitlines()[0][:300]
            raise SweepFailed(
                f"MLflow at {mask_url(str(self.mlflow_uri))} failed: {first}; start "
                "the tracking server (or fix MLFLOW_TRACKING_URI) and rerun the "
                "same command: the study goes on"
            ) from e

    def _run(self, arguments: list[str]) -> None:
        settings = self.settings
        space, fixed = self.setup.check(arguments)
        sampler = self.setup.sampler(space)
        if self.mlflow_uri:
            experiment_id = tracking_backend.prepare_experiment(
                self.mlflow_uri, self.config.mlflow.experiment
            )
        storage = study_db.open_storage(
            settings.storage, settings.heartbeat_interval, settings.grace_period
        )
        study = self.setup.open_study(storage, sampler)
        with study_db.ask_lock(storage, settings.storage):  # no trial asked but unmarked
            dead = study_db.fail_dead_workers(study, storage, settings.grace_period)
        if self.mlflow_uri:
            kill_trial_runs(self.mlflow_uri, dead)
        done, shown = study_db.budget_used(study), search_space.describe(space)
        where, name = mask_url(settings.storage), type(sampler).__name__
        level = logging.INFO if ROLE.is_driver else logging.DEBUG  # the driver's lines
        log.log(level, "study %s in %s: %d/%d trials done, sampler %s, search %s",
                study.study_name, where, done, settings.n_trials, name, shown)  # fmt: skip
        with study_db.ask_lock(storage, settings.storage):
            parent = (
                NoSweepRun()
                if not self.mlflow_uri
                else SweepRun.open(
                    self.mlflow_uri,
                    experiment_id,
                    study,
                    {
                        "study_name": study.study_name,
                        "storage": settings.storage,
                        "sampler": type(sampler).__name__,
                        "pruner": type(self.setup.pruner()).__name__,
                        "direction": self.directions,
                        "objectives": self.objectives,
                        "n_trials": settings.n_trials,
                        "search_space": {k: repr(v) for k, v in space.items()},
                    },
                )
            )
            self.setup.enqueue(study)
        parent.set_tags({"sweep_dir": self.sweep_dir})
        if self.mlflow_uri:
            log.log(level, "MLflow: %s", tracking_backend.ui_link(self.mlflow_uri, experiment_id))
        started = time.perf_counter()
        with protocol.storage_env(settings.storage):
            states = self._loop(study, storage, space, fixed, parent)
        if ROLE.is_worker:  # its driver closes the sweep
            log.info("worker on %s: %d trial(s) trained here", ROLE.worker_device, len(states))
            return
        report.finish(self, study, parent, len(states), time.perf_counter() - started)

    # --- the loop ------------------------------------------------------------------------
    def _loop(self, study, storage, space, fixed, parent: SweepRun) -> list[TrialState]:
        """Ask, launch, tell until the budget is spent, failures pass the rate, or a signal:
        streamed to a launcher that can (each freed slot takes the next trial), else in
        batches of n_jobs."""
        heartbeat = study_db.Heartbeat(storage, study.study_name, self.settings.heartbeat_interval)
        heartbeat.start()
        feed = StudyFeed(self, study, storage, space, fixed, parent.run_id, heartbeat)
        try:
            with signals.stop_on_signals():
                submit = None if self.settings.batches else in_flight.submitter(self.launcher)
                if hasattr(self.launcher, "stream") and not self.settings.batches:
                    self.launcher.stream(feed, self.settings.n_jobs)
                    signals.check()
                elif submit is not None:
                    self._asynchronously(feed, submit)
                else:
                    self._batches(feed)
        except BaseException as e:
            # Interrupted or an outage: fail this worker's in-flight trials (they run again).
            why = one_line(e) if isinstance(e, Outage) else "interrupted"
            for number in feed.in_flight:
                with contextlib.suppress(Exception):
                    study_db.fail_for_rerun(study, storage, number, why)
            with contextlib.suppress(Exception):
                parent.end("KILLED")
            raise
        finally:
            heartbeat.stopped.set()
        return feed.states

    def _batches(self, feed: StudyFeed) -> None:
        """Hydra's protocol: a batch of n_jobs trials launched, all of them told when it ends."""
        lost = 0  # trials whose job process died (killed, out of memory, node lost)
        while (
            not signals.check() and not feed.stopped and (asked := feed.ask(self.settings.n_jobs))
        ):
            numbers = [number for number, _ in asked]
            try:
                returns = self.launcher.launch(
                    [overrides for _, overrides in asked], initial_job_idx=numbers[0]
                )
            except Exception as e:  # noqa: BLE001 - a launcher reports a dead job so
                lost += self._lost(feed, numbers, e, lost)
                continue
            feed.tell(numbers, returns)

    def _asynchronously(self, feed: StudyFeed, submit) -> None:
        """n_jobs trials in flight (lenet_sweep.sweep.in_flight); the moment one ends, its result
        is told and the next trial launched."""
        running: dict[futures.Future, int] = {}
        lost = 0
        try:
            while True:
                while len(running) < self.settings.n_jobs and (asked := feed.next_job()):
                    running[submit(*asked)] = asked[0]
                if not running:
                    return
                done, _ = futures.wait(running, timeout=1, return_when=futures.FIRST_COMPLETED)
                signals.check()
                for future in done:
                    number = running.pop(future)
                    try:
                        ret = future.result()
                    except Exception as e:  # noqa: BLE001 - a launcher reports a dead job so
                        lost += self._lost(feed, [number], e, lost)
                        continue
                    feed.finished(number, ret)
        except BaseException:
            submit.close()
            raise

    def _lost(self, feed: StudyFeed, numbers: list[int], error: Exception, before: int) -> int:
        """Jobs whose process died (submitit and Ray raise for a whole batch): their trials
        run again; past max_failure_rate the sweep stops. Returns how many were lost."""
        if down := outage(error, self.sweep_dir):  # e.g. Hydra writing a job dir
            raise down from error
        lost = self._batch_lost(feed, numbers, error)
        if (before + lost) / self.settings.n_trials > self.settings.max_failure_rate:
            raise SweepFailed(
                f"{before + lost} trials lost with their job processes, "
                f"last: {type(error).__name__}: {mask_url(str(error))[:300]}; "
                "see the launcher's job logs"
            ) from error
        return lost

    def _batch_lost(self, feed: StudyFeed, numbers: list[int], error: Exception) -> int:
        """Fail the trials of dead jobs for a rerun, so that new trials replace them, and end
        their MLflow runs KILLED. Returns how many were lost."""
        why = f"job process died: {type(error).__name__}: {first_line(error, 300)}"
        numbers = set(numbers)
        log.warning("trials %s: %s; their trials run again", sorted(numbers), why)
        for number in numbers:
            study_db.fail_for_rerun(feed.study, feed.storage, number, why)
            feed.heartbeat.drop(number)
            feed.in_flight.pop(number, None)
        if self.mlflow_uri:
            lost = [t for t in feed.study.get_trials(deepcopy=False) if t.number in numbers]
            kill_trial_runs(self.mlflow_uri, lost)
        return len(numbers)
