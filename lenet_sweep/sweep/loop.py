"""The sweep loop: ask trials, hand them to the launcher, tell their results.

What the official hydra-optuna-sweeper lacks and this adds: n_trials is the study's total (a
rerun finishes what is left), dead workers' trials are failed first, pruning reaches jobs in
other processes, NaN/inf/raising jobs fail only their trial, several workers share one study
without overshooting n_trials (lenet_sweep.sweep.study_db), trials in flight instead of Hydra's
batches where the launcher allows (lenet_sweep.sweep.dispatch), and an app's additions at one
point (lenet_sweep.sweep.app). Jobs and sweeper meet through lenet_sweep.sweep.protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import optuna
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import signals
from lenet_sweep.config.plugins import LenetOptunaSweeperConf
from lenet_sweep.db_files import store_file
from lenet_sweep.errors import Outage, mask_url, one_line, outage
from lenet_sweep.process import ROLE
from lenet_sweep.sweep import app as apps
from lenet_sweep.sweep import protocol, report, search_space, study_db
from lenet_sweep.sweep.dispatch import dispatcher_for
from lenet_sweep.sweep.feed import StudyFeed
from lenet_sweep.sweep.setup import SweepSetup

log = logging.getLogger("lenet_sweep.sweep")
_ABSENT = object()
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
    warnings.showwarning = _warning_line  # Python's warnings (Optuna's plots'): timed lines
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    for name in _LAUNCHER_LOGS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one log line (logging.captureWarnings prints its source line too)."""
    where = f"{os.path.basename(filename)}:{lineno}"
    logging.getLogger("py.warnings").warning("%s (%s): %s", category.__name__, where, message)


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
        self.app = apps.load(settings.app, config, settings)

    def run(self, arguments: list[str]) -> None:
        try:
            self._run(arguments)
        except Outage:
            raise
        except Exception as e:
            where = store_file(e, self.app.tracking_uri, self.settings.storage)
            if down := outage(e, where):  # a store this process talks to went away, or is full
                raise down from e
            if failed := self.app.failure(e):
                raise failed from e
            raise

    def _run(self, arguments: list[str]) -> None:
        settings = self.settings
        space, fixed = self.setup.check(arguments, self.app.check)
        sampler = self.setup.sampler(space)
        self.app.prepare()
        storage = study_db.open_storage(
            settings.storage, settings.heartbeat_interval, settings.grace_period
        )
        study = self.setup.open_study(storage, sampler)  # and claims the sweep dir for it
        with study_db.ask_lock(storage, settings.storage):  # no trial asked but unmarked
            dead = study_db.fail_dead_workers(study, storage, settings.grace_period)
        self.app.trials_lost(dead)
        done, shown = study_db.budget_used(study), search_space.describe(space)
        where, name = mask_url(settings.storage), type(sampler).__name__
        level = logging.INFO if ROLE.is_driver else logging.DEBUG  # the driver's lines
        log.log(level, "study %s in %s: %d/%d trials done, sampler %s, search %s",
                study.study_name, where, done, settings.n_trials, name, shown)  # fmt: skip
        with study_db.ask_lock(storage, settings.storage):
            record = self.app.open_record(study, self._params(space, sampler))
            self.setup.enqueue(study)
        record.set_tags({"sweep_dir": self.sweep_dir})
        started = time.perf_counter()
        with protocol.storage_env(settings.storage):
            overrides = self._overrides(study, space, fixed, record)
            feed = self._loop(study, storage, overrides, record)
        if ROLE.is_worker:  # its driver closes the sweep
            report.save_worker_groups(self.sweep_dir, feed.groups)
            log.info("worker on %s: %d trial(s) trained here", ROLE.worker_device, len(feed.states))
            return
        groups = {**feed.groups, **report.worker_groups(self.sweep_dir)}
        report.finish(self, study, record, len(feed.states), started, groups)

    def _params(self, space, sampler) -> dict:
        """The sweep's settings, as its record keeps them."""
        return {
            "study_name": self.settings.study_name,
            "storage": self.settings.storage,
            "sampler": type(sampler).__name__,
            "pruner": type(self.setup.pruner()).__name__,
            "direction": self.directions,
            "objectives": self.objectives,
            "n_trials": self.settings.n_trials,
            "search_space": {k: repr(v) for k, v in space.items()},
        }

    def _loop(self, study, storage, overrides: Callable, record) -> StudyFeed:
        """Ask, launch, tell until the budget is spent, failures pass the rate, or a signal, in
        the launcher's dispatch (lenet_sweep.sweep.dispatch)."""
        settings = self.settings
        heartbeat = study_db.Heartbeat(storage, study.study_name, settings.heartbeat_interval)
        heartbeat.start()
        budget = SimpleNamespace(
            n_trials=settings.n_trials,
            max_failure_rate=settings.max_failure_rate,
            storage=settings.storage,
        )
        feed = StudyFeed(study, storage, heartbeat, overrides, self.objectives, budget)
        name = OmegaConf.select(self.config, "hydra.runtime.choices", default={}).get(
            "hydra/launcher"
        )
        dispatcher = dispatcher_for(
            self.launcher, name, settings, self.sweep_dir, self.app.trials_lost
        )
        try:
            with signals.stop_on_signals():
                dispatcher.run(feed)
        except BaseException as e:
            # Interrupted or an outage: fail this worker's in-flight trials (they run again).
            why = one_line(e) if isinstance(e, Outage) else "interrupted"
            for number in feed.in_flight:
                with contextlib.suppress(Exception):
                    study_db.fail_for_rerun(study, storage, number, why)
            with contextlib.suppress(Exception):
                record.end("KILLED")
            raise
        finally:
            heartbeat.stopped.set()
        return feed

    def _overrides(self, study, space: dict, fixed: dict, record) -> Callable:
        """A trial -> its job's overrides: its params (suggested from `space`, and the custom
        search space's), the fixed values, its environment, the app's additions."""

        self.fixed = fixed

        def overrides(trial: optuna.Trial) -> list[str]:
            for name, dist in space.items():
                search_space.suggest(trial, name, dist)
            if self.settings.custom_search_space:
                get_method(self.settings.custom_search_space)(self.config, trial)
            given = self.trial_params(trial) + protocol.job_env(trial.number, study.study_name)
            return given + self.app.trial_overrides(trial, record)

        return overrides

    def trial_params(self, trial) -> list[str]:
        """A trial's (or a finished one's) params and the sweep's fixed values, as overrides."""
        given = [f"{self._key(k)}={search_space.format_value(v)}" for k, v in trial.params.items()]
        return given + [f"{k}={v}" for k, v in self.fixed.items() if k not in trial.params]

    def _key(self, key: str) -> str:
        """`+key` for a parameter the app's config lacks (one a custom search space added)."""
        missing = OmegaConf.select(self.config, key, default=_ABSENT) is _ABSENT
        return f"+{key}" if missing else key
