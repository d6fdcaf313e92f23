"""`hydra/launcher=fused`: the sweeper's batch of trials trained together on one device.

Each trial is prepared as a job of its own (Hydra's run_job: its job dir, .hydra/ configs and
environment; lenet_sweep.app.Job: its checks, data, net and MLflow child run), then the trials that
share model, optimizer (but lr), data, batch size and device train as one vmapped group
(lenet_sweep.fused), and each is recorded as if it had run alone. The sweeper sees one JobReturn
per trial, as from any launcher; the group's id is a tag on each child run.
"""

import copy
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
TAG_GROUP = "lenet_sweep.fused_group"  # "<group id> (<k> of <K>)" on each member's run


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.lenet_sweep_fused.launcher.FusedLauncher"
    max_group: int | None = None  # most trials in one group (memory: K x batch); null: no limit


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf)


def _prepare(cfg: DictConfig):
    """The task run inside each trial's Hydra job: everything before training."""
    from lenet_sweep.app import Job

    return Job.prepare(cfg)


class Composer:
    """Each trial's config as Hydra's `load_sweep_config` composes it (74 ms a trial on 2 cores,
    about 10 ms this way), but composed in full once per set of config-group choices: a trial
    that differs only in values (lr=..., epochs=..., trial.*=...) gets a copy of that composition
    with its values applied by Hydra's own override step, and its own overrides list and
    override_dirname. The sweep's own overrides are parsed once, each key classified once."""

    def __init__(self, config_loader, master: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader, self.master = config_loader, master
        self.composed: dict[tuple, DictConfig] = {}
        self.parser = OverridesParser.create()
        self.master_hydra = self.parser.parse_overrides(
            OmegaConf.to_container(master.hydra.overrides.hydra)
        )
        self.kinds: dict[tuple, bool] = {}

    def _is_value(self, o) -> bool:
        """key=value or ++key=value on a config value (the sweeper's hydra.job.env_set too),
        not a group choice, an append or a delete: those change what is composed."""
        key = o.key_or_group
        kind = (key, o.package, o.is_add(), o.is_delete())
        if kind not in self.kinds:
            self.kinds[kind] = not (o.package is not None or o.is_add() or o.is_delete()
                                    or "/" in key or key in self.master.hydra.runtime.choices
                                    or self.loader.repository.group_exists(key))  # fmt: skip
        return self.kinds[kind]

    def __call__(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        parsed = [*self.master_hydra, *self.parser.parse_overrides(overrides)]
        is_value = [self._is_value(o) for o in parsed]
        values = [o for o, v in zip(parsed, is_value, strict=True) if v]
        key = (tuple(o.input_line for o, v in zip(parsed, is_value, strict=True) if not v),
               tuple(o.key_or_group for o in values))  # fmt: skip
        if key not in self.composed:  # the first of its kind: composed as Hydra does
            self.composed[key] = self.loader.load_sweep_config(self.master, list(overrides))
            return copy.deepcopy(self.composed[key])
        cfg = copy.deepcopy(self.composed[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.overrides.hydra = [o.input_line for o in parsed if o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in task]
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)  # fmt: skip
        return cfg


def group_key(cfg: DictConfig) -> str:
    """What members of one group must share: all that shapes the step but lr, epochs and seed."""
    optimizer = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items()
                 if k != "lr"}  # fmt: skip
    shared = {"model": cfg.model, "optimizer": optimizer, "data": cfg.data,
              "batch_size": cfg.batch_size, "device": cfg.device, "cuda_graph": cfg.cuda_graph,
              "precision": cfg.precision}  # fmt: skip
    return OmegaConf.to_yaml(OmegaConf.create(shared), resolve=True)


class FusedLauncher(Launcher):
    def __init__(self, max_group: int | None = None) -> None:
        self.max_group = max_group

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.compose = Composer(hydra_context.config_loader, config)

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs fused", len(job_overrides))
        from lenet_sweep import painter

        painter.start()  # the trials' curves drawn beside the process that records them
        returns = [self._prepared(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        jobs = {
            i: r._return_value for i, r in enumerate(returns) if r.status == JobStatus.COMPLETED
        }
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
        ret = run_job(hydra_context=self.hydra_context, task_function=_prepare,
                      config=sweep_config, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")  # fmt: skip
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _groups(self, jobs: dict[int, Any]) -> list[list[tuple[int, Any]]]:
        by_key: dict[str, list] = {}
        for i, job in jobs.items():
            by_key.setdefault(group_key(job.cfg), []).append((i, job))
        size = self.max_group or len(jobs)
        return [g[s : s + size] for g in by_key.values() for s in range(0, len(g), size)]

    def _train(self, group: list[tuple[int, Any]], returns: list[JobReturn]) -> None:
        from lenet_sweep import config, signals
        from lenet_sweep.fused import Member, train_group

        first = group[0][1]
        group_id = uuid.uuid4().hex[:8]
        members = []
        for k, (_, job) in enumerate(group):
            job.mlrun.set_tags({TAG_GROUP: f"{group_id} ({k + 1} of {len(group)})"})
            members.append(Member(job.net, job.optimizer, job.cfg.epochs, job.cfg.seed,
                                  job.hooks(), job.resume,
                                  name=str(job.cfg.trial.name or f"job {group[k][0]}")))  # fmt: skip
        job_of = {id(m): job for m, (_, job) in zip(members, group, strict=True)}

        def record(member) -> None:  # as it leaves the group: on CUDA while the others train
            if member.error is None:
                try:
                    job_of[id(member)].record(member.result)
                except Exception as e:  # noqa: BLE001 - a store error fails this member alone
                    member.error = e

        # One copy of the data for the group: load_split hands every job the same tensors.
        log.info("training %d trials as one group on %s", len(group), first.device)
        with signals.stop_on_signals():
            train_group(members, first.train_split, first.test_split,
                        batch_size=first.cfg.batch_size,
                        graph=first.cfg.cuda_graph, progress=False,
                        autocast=config.autocast_dtype(first.cfg.precision),
                        on_leave=record)  # fmt: skip
        for (i, job), member in zip(group, members, strict=True):
            returns[i] = self._finished(returns[i], job, member)

    @staticmethod
    def _finished(ret: JobReturn, job, member) -> JobReturn:
        """The member's JobReturn and the end of its run (recorded as it left the group, unless
        it never rode): metrics, or the error that stopped it alone. The runs end here, after
        the group: an interrupted group leaves every run KILLED, as its trials FAIL."""
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
