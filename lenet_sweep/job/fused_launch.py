"""`hydra/launcher=fused`: the sweeper's batch of trials trained together on one device.

Each trial is prepared as a job of its own (Hydra's run_job: its job dir, .hydra/ configs and
environment; `Job.prepare`: its checks, data, net and MLflow child run), then the trials that
share a group key (lenet_sweep.config.identity) train as one group (lenet_sweep.fused.engine), and each
is recorded as if it had run alone. The sweeper sees one JobReturn per trial, as from any
launcher; the group's id is a tag on each child run.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from lenet_sweep import config, signals, speed
from lenet_sweep.config.knobs import check_knobs
from lenet_sweep.config.plugins import FusedLauncherConf
from lenet_sweep.job.compose import Composer
from lenet_sweep.job.job import Job
from lenet_sweep.sweep import protocol

log = logging.getLogger(__name__)
TAG_GROUP = "lenet_sweep.fused_group"  # "<group id> (<k> of <K>)" on each member's run


class FusedLaunch:
    """What the fused launcher plugin delegates to: one sweep's config, composer and groups."""

    def __init__(self, hydra_context, config_: DictConfig, max_group: int | None) -> None:
        self.hydra_context, self.config, self.max_group = hydra_context, config_, max_group
        check_knobs(self, FusedLauncherConf, "hydra.launcher.")  # before any study or run
        self.compose = Composer(hydra_context.config_loader, config_)

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns = [self._prepared(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        jobs = {i: r.return_value for i, r in enumerate(returns) if r.status == JobStatus.COMPLETED}
        try:
            for group in self._groups(jobs):
                self._train(group, returns)
        except BaseException as e:  # an interrupt: every run still open ends KILLED
            for job in jobs.values():
                job.mlrun.close(e)
            raise
        return returns

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
        return ret

    def _groups(self, jobs: dict[int, Job]) -> list[list[tuple[int, Job]]]:
        by_key: dict[str, list] = {}
        for i, job in jobs.items():
            by_key.setdefault(config.group_key(job.cfg), []).append((i, job))
        size = self.max_group or len(jobs)
        return [g[s : s + size] for g in by_key.values() for s in range(0, len(g), size)]

    def _train(self, group: list[tuple[int, Job]], returns: list[JobReturn]) -> None:
        from lenet_sweep.fused.engine import train_group

        first = group[0][1]
        group_id = uuid.uuid4().hex[:8]
        members = _members(group, group_id)
        job_of = {id(m): job for m, (_, job) in zip(members, group, strict=True)}

        def record(member) -> None:  # as it leaves the group: on CUDA while the others train
            if member.error is None:
                try:
                    job_of[id(member)].record(member.result)
                except Exception as e:  # noqa: BLE001 - a store error fails this member alone
                    member.error = e

        # One copy of the data for the group: load_split hands every job the same tensors.
        log.info("training %d trials as one group on %s", len(group), first.device)
        nets = [m.net for m in members]
        with signals.stop_on_signals(), speed.training(nets, first.device):
            occupancy = train_group(
                members,
                first.train_split,
                first.test_split,
                batch_size=first.cfg.batch_size,
                graph=first.cfg.cuda_graph,
                progress=False,
                autocast=config.autocast_dtype(first.cfg.precision),
                on_leave=record,
            )
        together = (group_id, occupancy.live_epochs, occupancy.slot_epochs)
        for (i, job), member in zip(group, members, strict=True):
            returns[i] = _finished(returns[i], job, member)
            setattr(returns[i], protocol.TRAINED_TOGETHER, together)  # the rate is the group's
        results = [m.state.result for m in members if m.state and m.state.result.train_time_s]
        if results:
            rate = sum(r.examples_seen for r in results) / max(r.train_time_s for r in results)
            log.info(
                "group of %d trials: %s examples/sec on %s, slots %.0f %% busy",
                len(group),
                f"{rate:,.0f}",
                first.device,
                100 * occupancy.share,
            )


def _members(group: list[tuple[int, Job]], group_id: str) -> list:
    """Each job as a member of its group, its run tagged with the group's id."""
    from lenet_sweep.fused.engine import Member

    members = []
    for k, (i, job) in enumerate(group):
        job.mlrun.set_tags({TAG_GROUP: f"{group_id} ({k + 1} of {len(group)})"})
        name = str(job.cfg.trial.name or f"job {i}")
        members.append(
            Member(
                job.net,
                job.optimizer,
                job.cfg.epochs,
                job.cfg.seed,
                job.hooks(),
                job.resume,
                name=name,
            )
        )
    return members


def _finished(ret: JobReturn, job: Job, member) -> JobReturn:
    """The member's JobReturn and the end of its run (recorded as it left the group, unless it
    never rode): metrics, or the error that stopped it alone. The runs end here, after the
    group: an interrupted group leaves every run KILLED, as its trials FAIL."""
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
