"""`hydra/launcher=fused`: the sweep's trials trained together on one device.

Each trial is prepared as a job of its own (Hydra's run_job: its job dir, .hydra/ configs and
environment; `Job.prepare`: its checks, data, net and MLflow child run), then the trials that
share a group key (lenet_sweep.config.identity) train as one group (lenet_sweep.fused.trainer), and each
is recorded as if it had run alone. The sweeper sees one JobReturn per trial, as from any
launcher: all of a batch together (`launch`), or each as its trial leaves the group while a
freed slot takes the study's next trial (`stream`, protocol.TrialFeed). The group's id and the
trial's slot are a tag on each child run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from lenet_sweep import config, signals, speed
from lenet_sweep.config.knobs import check_knobs
from lenet_sweep.config.plugins import FusedLauncherConf
from lenet_sweep.job import workers
from lenet_sweep.job.compose import Composer
from lenet_sweep.job.job import Job
from lenet_sweep.process import ROLE
from lenet_sweep.sweep import protocol

log = logging.getLogger(__name__)
COMPLETED = JobStatus.COMPLETED
TAG_GROUP = "lenet_sweep.fused_group"  # "<group id> (<k> of <K>)" on each member's run


class FusedLaunch:
    """What the fused launcher plugin delegates to: one sweep's config, composer and groups."""

    def __init__(self, hydra_context, config_: DictConfig, max_group, devices=None, on=None):
        self.hydra_context, self.config, self.max_group = hydra_context, config_, max_group
        self.devices, self.workers_on = devices, on or {}  # where workers run: engine, settings
        given = {"engine": None, "submitit": None, "ray": None, **self.workers_on}
        given = SimpleNamespace(**given, max_group=max_group, devices=devices)
        check_knobs(given, FusedLauncherConf, "hydra.launcher.")  # before any study or run
        self.compose = Composer(hydra_context.config_loader, config_)
        self.open: dict[int, Job] = {}  # prepared jobs not handed back yet: their runs are open
        self.repeats = int(config_.get("seeds", 1))  # seeds a trial trains: the slots it takes

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        """Hydra's batch: every trial prepared, grouped by key, each group trained to its end."""
        self._begin()
        returns = [self._prepared(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        jobs = [(initial_job_idx + i, r) for i, r in enumerate(returns) if r.status == COMPLETED]

        def hand_back(idx: int, ret: JobReturn) -> None:
            returns[idx - initial_job_idx] = ret

        with self._killed_on_error():
            for group in self._groups(jobs):
                self._train(group, hand_back)
        return returns

    def stream(self, feed: protocol.TrialFeed, slots: int) -> None:
        """The feed's trials in groups of `slots` (max_group at most): a slot its trial leaves
        takes the feed's next trial of the same group key at the next epoch boundary; each
        result is handed back as it comes. Trials of another key wait for the next group. With
        `devices`, workers do it, one a device (lenet_sweep.job.workers)."""
        if (devices := workers.resolve(self.devices)) and ROLE.is_driver:
            settings = {k: _plain(v) for k, v in self.workers_on.items()}
            sweeper = self.config.hydra.sweeper  # a silent worker's trials fail after this
            settings["stale_after"] = sweeper.get("grace_period", 30) + sweeper.get(
                "heartbeat_interval", 10
            )
            settings["sweep_dir"] = str(self.config.hydra.sweep.dir)  # submitit's folder in it
            workers.run(devices, settings.get("engine") or "local", settings)
            return
        self._begin()
        size = min(slots, self.max_group or slots)
        asked = _Asked(self, feed, max(1, size // self.repeats))  # jobs; each takes repeats slots
        with self._killed_on_error():
            while first := asked.take(asked.size):
                self._train(first, feed.finished, functools.partial(asked.take, 1, _key(first[0])))

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

    def _prepared(self, idx: int, overrides) -> JobReturn:
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
        if ret.status == JobStatus.COMPLETED:
            self.open[idx] = ret.return_value
        return ret

    def _groups(self, jobs: list[tuple[int, JobReturn]]) -> list[list[tuple[int, JobReturn]]]:
        by_key: dict[str, list] = {}
        for job in jobs:
            by_key.setdefault(_key(job), []).append(job)
        size = max(1, (self.max_group or len(jobs) * self.repeats) // self.repeats)
        return [g[s : s + size] for g in by_key.values() for s in range(0, len(g), size)]

    def _train(self, group, hand_back, refill=None) -> None:
        """Train `group` ((idx, JobReturn) each) as one; `refill()` gives a freed slot its next
        trial ([] when there is none); `hand_back(idx, ret)` takes each result as it comes."""
        from lenet_sweep.fused.trainer import Occupancy, train_group

        first = group[0][1].return_value
        size = len(group) * self.repeats
        slots = _GroupRecords(self, uuid.uuid4().hex[:8], size, hand_back, Occupancy())

        def next_member(k: int):  # a waiting seed of a repeated trial first, else the next trial
            if not slots.waiting and (got := refill()):
                slots.waiting += slots.members(k, *got[0])
            return slots.waiting.pop(0) if slots.waiting else None

        members = [
            m for k, (i, ret) in enumerate(group) for m in slots.members(k * self.repeats, i, ret)
        ]
        # One copy of the data for the group: load_split hands every job the same tensors.
        log.info("training %d trials as one group on %s", len(group), first.device)
        with signals.stop_on_signals(), speed.training([m.net for m in members], first.device):
            train_group(
                members,
                first.data,
                dataclasses.replace(first.spec(), progress=False),
                on_leave=slots.leave,
                refill=next_member if refill else None,
                occupancy=slots.occupancy,
            )
        for member in members:  # those that never rode (resumed at their end) are handed back too
            slots.leave(member)
        slots.log_rate(first.device)


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _key(job: tuple[int, JobReturn]) -> str:
    return config.group_key(job[1].return_value.cfg)


class _Asked:
    """Trials asked from a feed and prepared as jobs, waiting for a slot: the next group's
    first members, or a freed slot's trial of the same group key."""

    def __init__(self, launch: FusedLaunch, feed: protocol.TrialFeed, size: int) -> None:
        self.launch, self.feed, self.size = launch, feed, size
        self.waiting: list[tuple[int, JobReturn]] = []  # of another key than the training group's
        self.dry = False  # the feed had nothing more

    def take(self, n: int, key: str | None = None) -> list[tuple[int, JobReturn]]:
        """Up to n jobs of one group key (`key`, else the first one's), the waiting ones first;
        at most `size` wait, so a group of one key cannot ask the whole study."""
        taken = []
        for job in list(self.waiting):
            if len(taken) < n and (key or _key(job)) == _key(job):
                key = _key(job)
                taken.append(job)
                self.waiting.remove(job)
        while len(taken) < n and len(self.waiting) < self.size and (job := self._ask()):
            if (key or _key(job)) == _key(job):
                key = _key(job)
                taken.append(job)
            else:
                self.waiting.append(job)
        return taken

    def _ask(self) -> tuple[int, JobReturn] | None:
        """The feed's next trial as a prepared job; one that fails to prepare is handed back."""
        while not self.dry:
            if (asked := self.feed.next_job()) is None:
                self.dry = True
            else:
                ret = self.launch._prepared(*asked)
                if ret.status == JobStatus.COMPLETED:
                    return asked[0], ret
                self.feed.finished(asked[0], ret)
        return None


class _GroupRecords:
    """A training group's jobs: each as a member (its run tagged with the group and its slot),
    each result handed back as its member leaves."""

    def __init__(self, launch: FusedLaunch, group_id, size, hand_back, occupancy) -> None:
        self.launch, self.group_id, self.size = launch, group_id, size
        self.hand_back, self.occupancy = hand_back, occupancy
        self.jobs: dict[int, tuple] = {}  # id(member) -> (idx, its JobReturn, its Seeds or None)
        self.waiting: list = []  # seeds of a repeated trial that found no free slot yet
        self.examples = self.trials = 0

    def members(self, slot: int, idx: int, ret: JobReturn) -> list:
        """The job's members: one, or one per seed of a repeated trial (lenet_sweep.job.seeds)."""
        from lenet_sweep.fused.trainer import Member

        job: Job = ret.return_value
        job.mlrun.set_tags({TAG_GROUP: f"{self.group_id} (slot {slot + 1} of {self.size})"})
        name = str(job.cfg.trial.name or f"job {idx}")
        if (seeds := job.seeds()) is not None:
            members = seeds.members
        else:
            members = [Member.of(job.net, job.optimizer, job.spec(), name=name)]
        self.jobs.update((id(m), (idx, ret, seeds)) for m in members)
        return members

    def leave(self, member) -> None:
        """Record the member's trial as it leaves (a repeated one: its last seed; on CUDA while
        the others train), end its run and hand its JobReturn back; once."""
        if (got := self.jobs.pop(id(member), None)) is None:
            return
        idx, ret, seeds = got
        if seeds is not None:
            if any(id(m) in self.jobs for m in seeds.members):
                return  # its other seeds still train
            member = seeds.as_member()
        job = self.launch.open.pop(idx)
        if member.error is None:
            try:
                job.record(member.result)
                if seeds is not None:
                    job.mlrun.log_metrics(seeds.final_by_seed())
            except Exception as e:  # noqa: BLE001 - a store error fails this member alone
                member.error = e
        self.trials += 1
        if member.state:
            self.examples += member.result.examples_seen
        ret = _finished(ret, job, member)
        setattr(ret, protocol.TRAINED_TOGETHER, (self.group_id, self.occupancy))
        self.hand_back(idx, ret)

    def log_rate(self, device) -> None:
        if self.occupancy.train_s:
            log.info(
                "group of %d trials in %d slots: %s examples/sec on %s, slots %.0f %% busy",
                self.trials,
                self.size,
                f"{self.examples / self.occupancy.train_s:,.0f}",
                device,
                100 * self.occupancy.share,
            )


def _finished(ret: JobReturn, job: Job, member) -> JobReturn:
    """The member's JobReturn and the end of its run: metrics, or the error that stopped it
    alone. An interrupted group leaves every run still open KILLED, as its trials FAIL."""
    try:
        if member.error is not None:
            raise member.error
        ret.return_value = job.complete(member.result)
        ret.status = JobStatus.COMPLETED
    except Exception as e:  # noqa: BLE001 - this member's failure, recorded as its trial's
        job.failed(e)
        job.mlrun.close(e)
        ret.return_value, ret.status = e, JobStatus.FAILED
        return ret
    job.mlrun.close()
    return ret
