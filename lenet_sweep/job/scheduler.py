"""One fused group from its first trials to its last departure: the scheduler between a sweep's
trials and the fused trainer (lenet_sweep.fused.trainer.GroupTrainer).

It owns the group's slots (which trial's seed rides each) and the backlog (trials prepared but
waiting: another group key's, or a trial's seeds that found no free slot yet), takes trials from
its source, and hands each result back as a typed `protocol.TrialResult` the moment its trial
leaves. At every epoch boundary, on every device, in this order: the epoch is collected; the
trials that leave (reached their epochs, pruned, diverged, failed) are recorded and their
results handed back (the sweep tells the study); only then are the freed slots' next trials
asked, so the sampler has seen every result before its next ask. On the CPU the newcomers are
written into their slots at once and the next epoch launched; on CUDA the next epoch is launched
before the hooks (it trains while they run), so a slot freed at a boundary takes its newcomer at
the next one, riding one epoch idle.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from hydra.core.utils import JobReturn, JobStatus

from lenet_sweep import config, signals, speed
from lenet_sweep.fused.trainer import GroupTrainer, Member, Occupancy
from lenet_sweep.job.job import Job
from lenet_sweep.sweep.protocol import GroupShare, TrialResult

log = logging.getLogger("lenet_sweep.job.fused_launch")
TAG_GROUP = "lenet_sweep.fused_group"  # "<group id> (<k> of <K>)" on each member's run


@dataclass
class Trial:
    """A trial prepared as a job (Hydra's run_job of Job.prepare): its number and JobReturn."""

    idx: int
    ret: JobReturn

    @property
    def job(self) -> Job:
        return self.ret.return_value

    @property
    def key(self) -> str:
        return config.group_key(self.job.cfg)


class Backlog:
    """Trials from a source (`ask()`: the next prepared trial, None when there is none), waiting
    for a slot: the next group's first members, or a freed slot's trial of the same key. At most
    `size` wait, so that a group of one key cannot ask the whole study."""

    def __init__(self, ask: Callable[[], Trial | None], size: int) -> None:
        self.ask, self.size = ask, size
        self.waiting: list[Trial] = []  # of another key than the training group's
        self.dry = False  # the source had nothing more

    def take(self, n: int, key: str | None = None) -> list[Trial]:
        """Up to n trials of one group key (`key`, else the first one's), the waiting first."""
        taken = []
        for trial in list(self.waiting):
            if len(taken) < n and (key or trial.key) == trial.key:
                key = trial.key
                taken.append(trial)
                self.waiting.remove(trial)
        while len(taken) < n and len(self.waiting) < self.size and not self.dry:
            if (trial := self.ask()) is None:
                self.dry = True
            elif (key or trial.key) == trial.key:
                key = trial.key
                taken.append(trial)
            else:
                self.waiting.append(trial)
        return taken


class FusedScheduler:
    """One group: its trials seated as members (a member a seed), trained by a GroupTrainer,
    recorded and handed back (`hand_back(TrialResult)`) as each leaves; freed slots refilled
    from `backlog` (None: no refill, the group trains its first trials to their end)."""

    def __init__(self, open_jobs: dict[int, Job], hand_back, backlog: Backlog | None) -> None:
        self.open, self.hand_back, self.backlog = open_jobs, hand_back, backlog
        self.group_id = uuid.uuid4().hex[:8]
        self.occupancy = Occupancy()
        self.seated: dict[int, tuple[Trial, object]] = {}  # id(member) -> (trial, its Seeds)
        self.waiting: list[Member] = []  # a seated trial's seeds that found no free slot yet
        self.pending: dict[int, Member] = {}  # slot -> the newcomer asked for it, not written
        self.size = self.trials = self.examples = 0

    def run(self, first: list[Trial]) -> Occupancy:
        """Train `first` (one group key) and, while the backlog gives, their slots' successors."""
        self.size = sum(t.job.cfg.seeds for t in first)
        members: list[Member] = []
        for trial in first:
            members += self._seat(trial, len(members))
        job = first[0].job  # one copy of the data for the group: every job has the same tensors
        spec = dataclasses.replace(job.spec(), progress=False)
        log.info("training %d trials as one group on %s", len(first), job.device)
        with signals.stop_on_signals(), speed.training([m.net for m in members], job.device):
            trainer = GroupTrainer(members, job.data, spec, self.occupancy)
            for member in trainer.left_at_start:  # resumed at their end: nothing to train
                self._leave(member)
            if trainer.group is not None:
                self._train(trainer, first[0].key)
        self._log_rate(job.device)
        return self.occupancy

    def _train(self, trainer: GroupTrainer, key: str) -> None:
        trainer.launch()
        while trainer.in_flight:
            ended = trainer.collect()
            if trainer.overlaps:  # the next epoch trains while the hooks run
                self._write_pending(trainer)
                trainer.launch()
            for member in trainer.run_hooks(ended):
                self._leave(member)  # recorded and told before any slot asks again
            self._ask_for_free_slots(trainer, key)
            if not trainer.overlaps:
                self._write_pending(trainer)
                trainer.launch()
            signals.check()  # Ctrl-C / SIGTERM: stop at the epoch boundary
        trainer.close()

    def _ask_for_free_slots(self, trainer: GroupTrainer, key: str) -> None:
        """Each freed slot's next member: a waiting seed first, else the next trial's seeds."""
        for slot in trainer.free_slots():
            if slot in self.pending or trainer.tail:
                continue
            if not self.waiting and self.backlog and (got := self.backlog.take(1, key)):
                self.waiting += self._seat(got[0], slot)
            if not self.waiting:
                trainer.tail = True  # nothing left to ask: the group's tail begins
                return
            self.pending[slot] = self.waiting.pop(0)

    def _write_pending(self, trainer: GroupTrainer) -> None:
        for slot, member in list(self.pending.items()):
            del self.pending[slot]
            if not trainer.write(slot, member):  # resumed at its end: it leaves at once
                self._leave(member)

    def _seat(self, trial: Trial, slot: int) -> list[Member]:
        """The trial's members: one, or one per seed (lenet_sweep.job.seeds), from `slot` on;
        its run tagged with the group and its (first) slot."""
        job = trial.job
        name = str(job.cfg.trial.name or f"job {trial.idx}")
        job.mlrun.set_tags({TAG_GROUP: f"{self.group_id} (slot {slot + 1} of {self.size})"})
        if (seeds := job.seeds()) is not None:
            members = seeds.members
        else:
            members = [Member.of(job.net, job.optimizer, job.spec(), name=name)]
        self.seated.update((id(m), (trial, seeds)) for m in members)
        return members

    def _leave(self, member: Member) -> None:
        """Record the member's trial as it leaves (a trial of seeds: with its last seed), end its
        run and hand its result back; once."""
        if (got := self.seated.pop(id(member), None)) is None:
            return
        trial, seeds = got
        if seeds is not None:
            if any(id(m) in self.seated for m in seeds.members):
                return  # its other seeds still train
            member = seeds.as_member()
        job = self.open.pop(trial.idx)
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
        ret = finished(trial.ret, job, member)
        self.hand_back(TrialResult(trial.idx, ret, GroupShare(self.group_id, self.occupancy)))

    def _log_rate(self, device) -> None:
        if self.occupancy.train_s:
            log.info(
                "group of %d trials in %d slots: %s examples/sec on %s, slots %.0f %% busy",
                self.trials,
                self.size,
                f"{self.examples / self.occupancy.train_s:,.0f}",
                device,
                100 * self.occupancy.share,
            )


def finished(ret: JobReturn, job: Job, member: Member) -> JobReturn:
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
