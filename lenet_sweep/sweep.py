"""An Optuna study driven through a Hydra launcher: ask a batch, launch it, tell the results.

What the official hydra-optuna-sweeper lacks and this adds: n_trials is the study's total (a
rerun finishes what is left), stale trials of crashed workers are failed first, pruning reaches
jobs in other processes through the storage, NaN/inf/raising jobs fail only their trial, several
workers share one study without overshooting n_trials, and the sweep is one MLflow parent run
with a child run per trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lenet_sweep import search_space, signals, tracking
from lenet_sweep.errors import UserError
from lenet_sweep.trial_link import STORAGE_ENV

log = logging.getLogger("lenet_sweep.sweep")

# We record heartbeats ourselves (Heartbeat below), which Optuna warns about outside optimize().
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HOST = tracking.HOST


class SweepFailed(UserError):
    """The sweep ran but its trials failed (exit 1; bad input exits 2)."""


FAIL_REASON = "fail_reason"  # user attr set on trials that failed by their own doing
# Trials that count toward n_trials; FAIL ones count only when the job itself failed
# (a trial failed because its worker died is run again).
_BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass
class SweepSettings:
    """hydra.sweeper.*: the official Optuna sweeper's keys plus pruner and heartbeat."""

    sampler: Any = None
    direction: str = "maximize"
    storage: str | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.5
    params: Any = None
    custom_search_space: str | None = None
    pruner: Any = None
    heartbeat_interval: int = 10
    grace_period: int = 30

    def validate(self) -> None:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise UserError(f"hydra.sweeper.n_trials={self.n_trials}: must be an integer >= 1")
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise UserError(f"hydra.sweeper.n_jobs={self.n_jobs}: must be an integer >= 1")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise UserError(
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: must be in [0, 1]"
            )
        if self.direction not in ("maximize", "minimize"):
            raise UserError(
                f"hydra.sweeper.direction={self.direction}: allowed: maximize, minimize"
            )
        if not self.study_name:
            raise UserError("hydra.sweeper.study_name is empty: name the study to store and resume")


def open_storage(
    url: str, heartbeat_interval: int, grace_period: int
) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats so a crashed worker's trials can be failed."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                engine_kwargs={"pool_pre_ping": True},
            )
        except Exception as e:  # noqa: BLE001 - driver errors vary: connection refused, bad URL...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            # Workers starting together race to create Optuna's tables: the loser retries.
            racing = any(w in first for w in ("already exists", "duplicate key", "UNIQUE"))
            if racing and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise UserError(
                f"Optuna storage {tracking.mask_url(url)} is not reachable ({type(e).__name__}: "
                f"{tracking.mask_url(first)}); start the database or fix hydra.sweeper.storage"
            ) from e
    raise AssertionError("unreachable")


@contextlib.contextmanager
def ask_lock(storage: optuna.storages.RDBStorage, url: str) -> Iterator[None]:
    """Serialise count-then-ask across worker processes, so n_trials is never overshot."""
    if url.startswith("sqlite:///"):
        with open(url[len("sqlite:///") :] + ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy

        key = 0x1E9E75  # one advisory lock id for lenet_sweep's ask step
        with storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    else:  # other databases: concurrent workers may overshoot n_trials by up to n_jobs - 1
        yield


class Heartbeat(threading.Thread):
    """Records a heartbeat for this worker's running trials (Optuna does this only in optimize)."""

    def __init__(self, storage: optuna.storages.RDBStorage, interval: int):
        super().__init__(daemon=True, name="optuna-heartbeat")
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.stopped = threading.Event()

    def beat(self) -> None:
        for trial_id in list(self.trial_ids):
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                self.storage.record_heartbeat(trial_id)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat()


def repair_stale_trials(study: optuna.Study, mlflow_uri: str) -> list[int]:
    """Fail trials left RUNNING by dead workers; end their MLflow runs KILLED. Returns numbers."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        same_host_dead = attrs.get("worker_host") == HOST and not tracking.pid_alive(
            attrs.get("worker_pid", 0)
        )
        if same_host_dead:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    optuna.storages.fail_stale_trials(study)  # other hosts: heartbeat older than grace period
    still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    repaired = sorted(before - still)
    client = tracking.client(mlflow_uri)
    for trial in study.get_trials(deepcopy=False):
        if trial.number in repaired and trial.state == TrialState.FAIL:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                with contextlib.suppress(Exception):
                    if client.get_run(run_id).info.status == "RUNNING":
                        client.set_terminated(run_id, status="KILLED")
                        client.set_tag(run_id, "optuna.trial_state", "FAIL (worker died)")
    if repaired:
        log.warning(
            "failed %d stale trial(s) left RUNNING by a dead worker: %s", len(repaired), repaired
        )
    return repaired


def _format_value(value: Any) -> str:
    """A suggested value as a Hydra override value (strings quoted)."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    return repr(value)


def suggest(trial: optuna.Trial, name: str, dist) -> Any:
    """Sample one parameter from a prepared distribution through Trial's public API."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


class OptunaSweep:
    """One sweep process: settings + Hydra's composed config + a launcher."""

    def __init__(self, settings: SweepSettings, config: DictConfig, launcher, sweep_dir: str):
        self.settings, self.config, self.launcher = settings, config, launcher
        self.sweep_dir = Path(sweep_dir)
        self.mlflow_uri = tracking.resolve_tracking_uri(config.mlflow.tracking_uri)

    # --- set-up -------------------------------------------------------------------------
    def _search_space(self, arguments: list[str]):
        params = self.settings.params or {}
        params_conf = [f"{k}={v}" for k, v in params.items()]
        space, fixed = search_space.parse(params_conf + list(arguments))
        if not space and not self.settings.custom_search_space:
            raise UserError(
                "the search space is empty; give hydra.sweeper.params or overrides such as "
                "'lr=tag(log, interval(0.01, 3.0))'"
            )
        return space, fixed

    def _sampler(self, space) -> optuna.samplers.BaseSampler:
        # Hydra instantiates the sweeper recursively: sampler and pruner arrive built (grid partial).
        sampler = self.settings.sampler
        if not sampler:
            return optuna.samplers.TPESampler()
        if isinstance(sampler, functools.partial):  # grid: needs the space listed
            if sampler.func is optuna.samplers.GridSampler:
                grid = search_space.grid_choices(space)
                size = math.prod(len(v) for v in grid.values())
                if size < self.settings.n_trials:
                    log.info(
                        "grid has %d points: n_trials %d -> %d", size, self.settings.n_trials, size
                    )
                    self.settings.n_trials = size
                return sampler(grid)
            sampler = sampler()
        return sampler

    def _pruner(self) -> optuna.pruners.BasePruner:
        if not isinstance(self.settings.pruner, optuna.pruners.BasePruner):
            return optuna.pruners.NopPruner()  # pruner: none composes to an empty node
        return self.settings.pruner

    def _parent_run(self, study: optuna.Study, storage, space, sampler, experiment_id) -> str:
        """The sweep's MLflow parent run: one per study, reopened when the sweep resumes."""
        client = tracking.client(self.mlflow_uri)
        with ask_lock(storage, self.settings.storage):
            run_id = study.user_attrs.get("mlflow_parent_run_id")
            if run_id is None:
                run = client.create_run(
                    experiment_id,
                    run_name=f"sweep {study.study_name}",
                    tags={
                        "lenet_sweep.role": "sweep",
                        "optuna.study_name": study.study_name,
                    },
                )
                run_id = run.info.run_id
                study.set_user_attr("mlflow_parent_run_id", run_id)
                from mlflow.entities import Param

                client.log_batch(
                    run_id,
                    params=[
                        Param(k, str(v)[:6000])
                        for k, v in {
                            "study_name": study.study_name,
                            "storage": tracking.mask_url(self.settings.storage),
                            "sampler": type(sampler).__name__,
                            "pruner": type(self._pruner()).__name__,
                            "direction": self.settings.direction,
                            "n_trials": self.settings.n_trials,
                            "search_space": {k: repr(v) for k, v in space.items()},
                        }.items()
                    ],
                )
            else:
                client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "sweep_dir", str(self.sweep_dir))
        return run_id

    # --- the loop ------------------------------------------------------------------------
    @staticmethod
    def budget_used(study: optuna.Study) -> int:
        return sum(
            1
            for t in study.get_trials(deepcopy=False)
            if t.state in _BUDGET_STATES
            or (t.state == TrialState.FAIL and FAIL_REASON in t.user_attrs)
        )

    @staticmethod
    def job_failures(study: optuna.Study) -> int:
        """Trials failed by their own job (not by a dead worker or an interrupt)."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return sum(1 for t in trials if FAIL_REASON in t.user_attrs)

    def _too_many_failures(self, study: optuna.Study) -> bool:
        """Failures measured against n_trials: once past the rate, the sweep can only end past it."""
        return self.job_failures(study) / self.settings.n_trials > self.settings.max_failure_rate

    def _ask(self, study, space, storage) -> list[optuna.Trial]:
        with ask_lock(storage, self.settings.storage):
            left = self.settings.n_trials - self.budget_used(study)
            trials = [study.ask() for _ in range(max(0, min(self.settings.n_jobs, left)))]
            for trial in trials:
                trial.set_user_attr("worker_host", HOST)
                trial.set_user_attr("worker_pid", os.getpid())
        return trials

    def _overrides(self, trial, space, fixed, parent_run_id) -> list[str]:
        for name, dist in space.items():
            suggest(trial, name, dist)
        if self.settings.custom_search_space:
            from hydra.utils import get_method

            get_method(self.settings.custom_search_space)(self.config, trial)
        overrides = [f"{k}={_format_value(v)}" for k, v in trial.params.items()]
        overrides += [f"{k}={v}" for k, v in fixed.items() if k not in trial.params]
        overrides += [
            f"trial.number={trial.number}",
            f"trial.study_name={_format_value(trial.study.study_name)}",
            f"trial.parent_run_id={parent_run_id}",
        ]
        return overrides

    @staticmethod
    def _record(study, trial, **kwargs) -> None:
        try:
            study.tell(trial, **kwargs)
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is covered, which raises outside
            # optimize(); the state is stored by then (Optuna writes it in a finally).
            if "Study.stop" not in str(e):
                raise

    def _tell(self, study, trial, ret: JobReturn) -> str:
        """Record one job's end in the study; returns the trial's final state name."""
        error: BaseException | None = None
        value = None
        if ret.status == JobStatus.COMPLETED:
            try:
                value = float(ret.return_value)
            except (TypeError, ValueError):
                error = ValueError(f"job returned {ret.return_value!r}, not a number")
            else:
                if not math.isfinite(value):
                    error = ValueError(f"job returned {value}")
        else:
            error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            self._record(study, trial, state=TrialState.PRUNED)
            log.info("trial %d pruned (%s)", trial.number, error)
            return "PRUNED"
        if error is not None:
            reason = f"{type(error).__name__}: {tracking.mask_url(str(error))}"[:500]
            study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
            self._record(study, trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, reason)
            return "FAIL"
        self._record(study, trial, values=[value])
        return "COMPLETE"

    def run(self, arguments: list[str]) -> None:
        self.settings.validate()
        space, fixed = self._search_space(arguments)
        sampler = self._sampler(space)
        storage = open_storage(
            self.settings.storage, self.settings.heartbeat_interval, self.settings.grace_period
        )
        experiment_id = tracking.prepare_experiment(self.mlflow_uri, self.config.mlflow.experiment)
        try:
            study = optuna.create_study(
                study_name=self.settings.study_name,
                storage=storage,
                sampler=sampler,
                pruner=self._pruner(),
                direction=self.settings.direction,
                load_if_exists=True,
            )
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"cannot open study {self.settings.study_name!r} in "
                f"{tracking.mask_url(self.settings.storage)} ({type(e).__name__}: "
                f"{tracking.mask_url(str(e).splitlines()[0] if str(e) else '')}); "
                "fix hydra.sweeper.storage / study_name"
            ) from e
        repair_stale_trials(study, self.mlflow_uri)
        log.info(
            "study %s in %s: %d/%d trials done, sampler %s, search space %s",
            study.study_name,
            tracking.mask_url(self.settings.storage),
            self.budget_used(study),
            self.settings.n_trials,
            type(sampler).__name__,
            {k: repr(v) for k, v in space.items()},
        )
        parent_run_id = self._parent_run(study, storage, space, sampler, experiment_id)

        # Jobs reach the study through this variable, not an override: Hydra logs overrides and
        # the URL may hold a password. Launcher processes started from here inherit it.
        os.environ[STORAGE_ENV] = self.settings.storage
        heartbeat = Heartbeat(storage, self.settings.heartbeat_interval)
        heartbeat.start()
        states: list[str] = []
        started = time.perf_counter()
        try:
            with signals.stop_on_signals():
                while not signals.check() and (trials := self._ask(study, space, storage)):
                    heartbeat.trial_ids = {t._trial_id for t in trials}
                    heartbeat.beat()
                    overrides = [self._overrides(t, space, fixed, parent_run_id) for t in trials]
                    returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
                    for trial, ret in zip(trials, returns, strict=True):
                        states.append(self._tell(study, trial, ret))
                    heartbeat.trial_ids = set()
                    if self._too_many_failures(study):
                        break
        except BaseException:
            self._abort(study, heartbeat.trial_ids, parent_run_id)
            raise
        finally:
            heartbeat.stopped.set()
        self._finish(study, parent_run_id, states, time.perf_counter() - started)

    def _abort(self, study, trial_ids, parent_run_id) -> None:
        """Interrupted: fail this worker's in-flight trials, mark the parent run KILLED."""
        for trial_id in trial_ids:
            with contextlib.suppress(Exception):
                study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        with contextlib.suppress(Exception):
            tracking.client(self.mlflow_uri).set_terminated(parent_run_id, status="KILLED")

    # --- results -------------------------------------------------------------------------
    def _finish(self, study, parent_run_id, states, elapsed) -> None:
        client = tracking.client(self.mlflow_uri)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
        summary = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
        ran = f"{len(states)} trial(s) run here in {elapsed:.1f}s"
        if not complete:
            client.set_terminated(parent_run_id, status="FAILED")
            raise SweepFailed(
                f"sweep {study.study_name}: no trial completed ({summary}; {ran}); "
                "see the trials' fail_reason in Optuna or the child runs' error tag in MLflow"
            )
        best = study.best_trial
        results = {"name": "optuna", "best_params": dict(best.params), "best_value": best.value}
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results))
        client.log_metric(parent_run_id, "best_value", best.value)
        client.set_tag(parent_run_id, "best_trial", best.number)
        for key, value in best.params.items():
            client.set_tag(parent_run_id, f"best.{key}", value)
        client.log_dict(parent_run_id, results, "optimization_results.yaml")
        self._log_plots(client, parent_run_id, study)
        failed = self.job_failures(study)
        too_many = self._too_many_failures(study)
        still_running = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
        if too_many:
            client.set_terminated(parent_run_id, status="FAILED")
        elif not still_running:  # another worker still running: it will end the parent run
            client.set_terminated(parent_run_id, status="FINISHED")
        log.info("sweep %s: %s; %s", study.study_name, summary, ran)
        here = [t for t in trials if t.user_attrs.get("worker_pid") == os.getpid()]
        busy = sum(t.user_attrs.get("train_time_s", 0.0) for t in here)
        if here and busy:
            log.info(
                "time in training + evaluation: %.1fs of %.1fs; overhead %.2fs per trial "
                "(Hydra, Optuna, MLflow, data loading)",
                busy,
                elapsed,
                (elapsed - busy) / len(here),
            )
        log.info(
            "best trial %d: %s = %.4f with %s",
            best.number,
            self.settings.direction[:3],
            best.value,
            " ".join(f"{k}={v}" for k, v in best.params.items()),
        )
        log.info("results: %s", self.sweep_dir / "optimization_results.yaml")
        if too_many:
            raise SweepFailed(
                f"sweep {study.study_name}: {failed} of {self.settings.n_trials} trials failed, more "
                f"than max_failure_rate={self.settings.max_failure_rate}; fix the failing trials "
                "(fail_reason in Optuna) or raise hydra.sweeper.max_failure_rate"
            )

    @staticmethod
    def _log_plots(client, run_id: str, study: optuna.Study) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        plots: dict[str, Callable] = {
            "optimization_history.png": ovm.plot_optimization_history,
            "parallel_coordinate.png": ovm.plot_parallel_coordinate,
            "param_importances.png": ovm.plot_param_importances,
        }
        for name, plot in plots.items():
            try:
                ax = plot(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                client.log_figure(run_id, fig, f"plots/{name}")
                plt.close(fig)
            except Exception as e:  # noqa: BLE001 - e.g. importances need >= 2 complete trials
                log.info("plot %s skipped: %s", name, str(e).splitlines()[0] if str(e) else e)


def settings_from(kwargs: dict) -> SweepSettings:
    """hydra.sweeper.* as Hydra instantiated it -> SweepSettings; unknown keys are refused."""
    unknown = set(kwargs) - set(SweepSettings.__dataclass_fields__)
    if unknown:
        raise UserError(
            f"unknown sweeper key(s) {sorted(unknown)}; "
            f"allowed: {sorted(SweepSettings.__dataclass_fields__)}"
        )
    if isinstance(kwargs.get("params"), DictConfig):
        kwargs = {**kwargs, "params": OmegaConf.to_container(kwargs["params"], resolve=True)}
    return SweepSettings(**kwargs)
