"""`hydra/launcher=fused`: the sweep's trials trained together on one device.

Each trial is prepared as a job of its own (Hydra's run_job: its job dir, .hydra/ configs and
environment; `Job.prepare`: its checks, data, net and MLflow child run), then the trials that
share a group key (lenet_sweep.config.identity) train as one group, scheduled by
lenet_sweep.job.scheduler, and each is recorded as if it had run alone. The sweeper gets each
trial's result: all of a batch together (`launch`, Hydra's API), or each as its trial leaves the
group (`stream`, protocol.TrialFeed: a TrialResult with the group's slot counts). The group's id
and the trial's slot are a tag on each child run.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from types import SimpleNamespace

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from lenet_sweep.config.knobs import check_knobs
from lenet_sweep.config.plugins import FusedLauncherConf
from lenet_sweep.job import workers
from lenet_sweep.job.compose import Composer
from lenet_sweep.job.job import Job
from lenet_sweep.job.scheduler import Backlog, FusedScheduler, Trial
from lenet_sweep.process import ROLE
from lenet_sweep.sweep import protocol
from lenet_sweep.sweep.protocol import TrialResult


class FusedLaunch:
    """What the fused launcher plugin delegates to: one sweep's config, composer and groups."""

    def __init__(self, hydra_context, config_: DictConfig, max_group, devices=None, on=None):
        self.hydra_context, self.config, self.max_group = hydra_context, config_, max_group
        self.devices, self.workers_on = devices, on or {}  # where workers run: engine, settings
        given = {"engine": None, "submitit": None, "ray": None, **self.workers_on}
        given = SimpleNamespace(**given, max_group=max_group, devices=devices)
        check_knobs(given, FusedLauncherConf, "hydra.launcher.")  # before any study or run
        engine = self.workers_on.get("engine") or "local"
        if workers.resolve(devices, here=engine in ("local", "submitit_local")):
            workers.check_engine(engine)  # the devices, and the engine's package
        self.compose = Composer(hydra_context.config_loader, config_)
        self.open: dict[int, Job] = {}  # prepared jobs not handed back yet: their runs are open
        self.seeds = int(config_.get("seeds", 1))  # seeds a trial trains: the slots it takes

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        """Hydra's batch: every trial prepared, grouped by key, each group trained to its end."""
        self._begin()
        returns = [self.prepare(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        trials = [Trial(initial_job_idx + i, r) for i, r in enumerate(returns) if _ready(r)]

        def hand_back(result: TrialResult) -> None:
            returns[result.number - initial_job_idx] = result.ret

        with self._killed_on_error():
            for group in self._groups(trials):
                FusedScheduler(self.open, hand_back, None).run(group)
        return returns

    def stream(self, feed: protocol.TrialFeed, slots: int, refill: bool = True) -> None:
        """The feed's trials in groups of `slots` (max_group at most), each result handed back
        as it comes: with `refill`, a slot its trial leaves takes the feed's next trial of the
        same group key (lenet_sweep.job.scheduler), trials of another key waiting for the next
        group; without, each group trains its first trials to their end (Hydra's batches).
        With `devices`, workers do it, one a device (lenet_sweep.job.workers)."""
        if (devices := workers.resolve(self.devices)) and ROLE.is_driver:
            workers.run(devices, self._worker_settings())
            return
        self._begin()
        size = min(slots, self.max_group or slots)
        backlog = Backlog(functools.partial(self._ask, feed), max(1, size // self.seeds))
        with self._killed_on_error():
            while first := backlog.take(backlog.size):
                FusedScheduler(self.open, feed.finished, backlog if refill else None).run(first)

    def _worker_settings(self) -> dict:
        settings = {k: _plain(v) for k, v in self.workers_on.items()}
        sweeper = self.config.hydra.sweeper  # a silent worker's trials fail after this
        settings["stale_after"] = sweeper.get("grace_period", 30) + sweeper.get(
            "heartbeat_interval", 10
        )
        settings["sweep_dir"] = str(self.config.hydra.sweep.dir)  # submitit's folder in it
        return settings

    def _ask(self, feed: protocol.TrialFeed) -> Trial | None:
        """The feed's next trial as a prepared job; one that fails to prepare is handed back."""
        while (asked := feed.next_job()) is not None:
            ret = self.prepare(*asked)
            if _ready(ret):
                return Trial(asked[0], ret)
            feed.finished(TrialResult(asked[0], ret))
        return None

    def _begin(self) -> None:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _killed_on_error(self):
        """An interrupt or an outage: every run still open ends KILLED."""
        try:
            yield
        except BaseException as e:
            for job in self.open.values():
                job.mlrun.close(e)
            self.open.clear()
            raise

    def prepare(self, idx: int, overrides) -> JobReturn:
        """Trial `idx` as a Hydra job of its own (its dir, .hydra/ and env): Job.prepare."""
        sweep_config = self.compose(list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=Job.prepare,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if _ready(ret):
            self.open[idx] = ret.return_value
        return ret

    def _groups(self, trials: list[Trial]) -> list[list[Trial]]:
        by_key: dict[str, list] = {}
        for trial in trials:
            by_key.setdefault(trial.key, []).append(trial)
        size = max(1, (self.max_group or len(trials) * self.seeds) // self.seeds)
        return [g[s : s + size] for g in by_key.values() for s in range(0, len(g), size)]


def _ready(ret: JobReturn) -> bool:
    return ret.status == JobStatus.COMPLETED


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
