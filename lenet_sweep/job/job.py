"""One run from config to records: everything is read, checked and built here, at the top of the
job, then handed to a trainer; the results are recorded in MLflow (and the trial's study)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import config
from lenet_sweep.core import hooks, memory
from lenet_sweep.core.checkpoint import FILE as CHECKPOINT_FILE
from lenet_sweep.core.checkpoint import Checkpoint
from lenet_sweep.core.checkpoint import find as find_checkpoint
from lenet_sweep.core.data import Splits, load_splits
from lenet_sweep.core.models import build
from lenet_sweep.core.state import TrainResult, TrainSpec
from lenet_sweep.sweep import protocol
from lenet_sweep.sweep.trial_link import TrialLink, prune
from lenet_sweep.tracking import backend
from lenet_sweep.tracking import params as run_params
from lenet_sweep.tracking.runs import TrackedRun

log = logging.getLogger("lenet_sweep")
TAG_RESUMED_FROM = "lenet_sweep.resumed_from"  # a resume that could not continue its own run
TAG_RESUMED_IN = "lenet_sweep.resumed_in"  # the dir of the latest resume of the same run


@dataclass
class HydraJob:
    """What this job takes from Hydra: its output dir, the user's overrides, the group options
    chosen, the sweeper's settings (its pruner and storage)."""

    output_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    choices: dict = field(default_factory=dict)
    sweeper_cfg: DictConfig | None = None

    @classmethod
    def current(cls) -> HydraJob:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return cls()  # called as a function (tests, notebooks)
        hc = HydraConfig.get()
        overrides = [o for o in hc.overrides.task if not protocol.is_trial_override(o)]
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
        return cls(hc.runtime.output_dir, overrides, choices, hc.sweeper)


@dataclass
class Job:
    """One run: `prepare` reads and checks everything and opens its MLflow run, `spec` tells a
    trainer how, `complete` records the result. `lenet_sweep.job.run` does it for one run;
    the fused launcher prepares several and trains them together."""

    cfg: DictConfig
    device: torch.device
    uri: str
    experiment_id: str
    hydra: HydraJob
    link: TrialLink | None
    data: Splits
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    resume: Checkpoint | None
    mlrun: TrackedRun
    recorded: bool = False
    extra_seeds: list = field(default_factory=list)  # (net, optimizer) of seed+1, ... (seeds)

    @classmethod
    def prepare(cls, cfg: DictConfig) -> Job:
        """Check, load and build; then open the MLflow run (RUNNING) and record the set-up."""
        config.validate(cfg)
        device = config.resolve_device(cfg.device)
        if cfg.resume:  # a checkpoint that is not there: told before any store is made
            find_checkpoint(str(cfg.resume))
        memory.check_config(cfg, build_model, device, cfg.seeds, f"seeds={cfg.seeds}")
        uri = backend.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        experiment_id = backend.prepare_experiment(uri, cfg.mlflow.experiment)
        backend.repair_orphaned_runs(uri, experiment_id)
        hydra_job = HydraJob.current()
        link = TrialLink.current(hydra_job.sweeper_cfg)
        # Data, model and checkpoint first: bad input fails before any MLflow run exists.
        data = load_splits(cfg.data, device, config.validation_size(cfg))
        net, optimizer = build_model(cfg, device)
        extra = [build_model(cfg, device, cfg.seed + r) for r in range(1, cfg.seeds)]
        resume, resume_path = Checkpoint.load(str(cfg.resume), cfg) if cfg.resume else (None, None)
        splits = {"training": data.train, "evaluation": data.test}
        if data.val is not None:  # a sweep's: what it tunes on, held out of the training images
            splits["validation"] = data.val
        mlrun = _open_run(cfg, device, uri, experiment_id, hydra_job, link, resume, splits)
        if resume:
            log.info("resuming %s after epoch %d", resume_path, resume.epoch)
        return cls(
            cfg,
            device,
            uri,
            experiment_id,
            hydra_job,
            link,
            data,
            net,
            optimizer,
            resume,
            mlrun,
            extra_seeds=extra,
        )

    def hooks(self) -> list:
        """This run's per-epoch hooks: its seed's, then its trial's."""
        return [*self.seed_hooks(first=True), *self.trial_hooks()]

    def seed_hooks(self, first: bool) -> list:
        """After each epoch of one seed: stop if diverged; a run of one seed's checkpoint."""
        epoch_hooks = [hooks.stop_on_divergence(self.cfg.divergence_threshold)]
        if first and self.hydra.output_dir and not self.extra_seeds:
            path = Path(self.hydra.output_dir) / CHECKPOINT_FILE
            identity = config.identity_text(self.cfg)
            epoch_hooks.append(
                hooks.save_checkpoint(path, mlflow_run_id=self.mlrun.run_id, identity=identity)
            )
        return epoch_hooks

    def trial_hooks(self) -> list:
        """After each epoch of the run (the mean of its seeds): record, maybe prune."""
        return _trial_hooks(self.mlrun, self.link)

    def nets(self) -> list:
        return [self.net, *(net for net, _ in self.extra_seeds)]

    def seeds(self):
        """The job's seeds as members of a fused group (lenet_sweep.job.seeds), if repeated."""
        if not self.extra_seeds:
            return None
        from lenet_sweep.job.seeds import Seeds

        nets = [(self.net, self.optimizer), *self.extra_seeds]
        seeds = [self.cfg.seed + r for r in range(len(nets))]
        name = str(self.cfg.trial.name or "")
        return Seeds(
            nets,
            seeds,
            self.cfg.epochs,
            lambda r: self.seed_hooks(r == 0),
            self.trial_hooks(),
            name,
        )

    def spec(self) -> TrainSpec:
        """How this run trains (either trainer; a fused group takes its step settings)."""
        cfg = self.cfg
        return TrainSpec(
            batch_size=cfg.batch_size,
            graph=cfg.cuda_graph,
            progress=cfg.progress,
            autocast=config.autocast_dtype(cfg.precision),
            epochs=cfg.epochs,
            seed=cfg.seed,
            hooks=self.hooks(),
            resume=self.resume,
        )

    def failed(self, error: BaseException) -> None:
        """What a run that diverged records before its run ends FAILED."""
        if isinstance(error, hooks.Diverged):
            self.mlrun.log_metrics({"train_loss": error.loss}, step=error.epoch)
            self.mlrun.set_tags({"diverged": "true", "diverged_at_epoch": error.epoch})

    def record(self, result: TrainResult) -> None:
        """The slow part of completing: totals, curves, the model (the fused launcher does it as
        a member leaves its group, while the others go on training)."""
        self.mlrun.log_record(result, self.net)
        self.recorded = True

    def complete(self, result: TrainResult, seeds: dict | None = None) -> dict[str, float]:
        """Record a finished training (unless `record` did), log its lines (`seeds`: each seed's
        result, for a line each), mark the trial's state; the run ends when its TrackedRun
        closes."""
        if not self.recorded:
            self.record(result)
        # A sweep's trial ends with the sweep's one line (and its one UI link) instead.
        level = logging.INFO if self.link is None else logging.DEBUG
        link = backend.ui_link(self.uri, self.experiment_id)
        log.log(level, "MLflow run %s: %s", self.mlrun.run_id, link)
        _print_seed_lines(result, self.device, level, seeds)
        if self.link is not None:
            self.mlrun.set_tags({protocol.TAG_TRIAL_STATE: "COMPLETE"})
            self.link.completed(result.train_time_s + result.eval_time_s)
        return result.metrics()


def build_model(cfg: DictConfig, device: torch.device, seed: int | None = None):
    """The configured net (seeded, Xavier-initialised) and its torch.optim optimizer."""
    make_net = instantiate(cfg.model, _partial_=True)
    return build(make_net, instantiate(cfg.optimizer), cfg.seed if seed is None else seed, device)


def _open_run(cfg, device, uri, experiment_id, job: HydraJob, link, resume, splits) -> TrackedRun:
    """The run's MLflow run, RUNNING: the resumed one where it may go on, else a new one, with its
    params, config, data sets and (resumed) the epochs it has."""
    knobs = {k: cfg[k] for k in run_params.KNOBS}
    params = run_params.run_params(config.identity(cfg), knobs, job.choices)
    name, tags = _run_name(cfg, params, job), _tags(device, job, link, cfg)
    client = backend.client(uri)
    run_id = resume and run_params.continuable(client, resume.mlflow_run_id, params)
    if resume and not run_id:  # a finished run, or other settings (epochs): a new run
        tags[TAG_RESUMED_FROM] = resume.mlflow_run_id
    if run_id and "hydra.output_dir" in tags:  # the same run goes on: its first dir stays
        tags[TAG_RESUMED_IN] = tags.pop("hydra.output_dir")
    mlrun = TrackedRun(uri, experiment_id, name, tags, run_id)
    with ended_on_error(mlrun):
        if link is not None:
            link.started(mlrun.run_id)
        if not run_id:
            mlrun.log_params(params)
            mlrun.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            mlrun.log_datasets(cfg.data.name, splits)
        if resume:
            mlrun.log_missing_epochs(resume.history)
    return mlrun


def _run_name(cfg: DictConfig, params: dict, job: HydraJob) -> str:
    """mlflow.run_name, else the sweeper's trial name, else the config and what the overrides
    change: `lenet sgd lr=0.9 ep=1 train_size=256`."""
    if cfg.mlflow.run_name or cfg.trial.name:
        return str(cfg.mlflow.run_name or cfg.trial.name)
    return config.run_name(cfg, params["model"], params["optimizer"], job.overrides)


def _tags(device, job: HydraJob, link: TrialLink | None, cfg: DictConfig) -> dict[str, str]:
    tags = {"device": str(device), "mlflow.source.name": "lenet_sweep"}
    if job.output_dir:
        tags["hydra.output_dir"] = job.output_dir
    if job.overrides:
        tags["hydra.overrides"] = " ".join(job.overrides)
    if commit := run_params.git_commit():
        tags["mlflow.source.git.commit"] = commit
    if link is not None:
        tags.update(link.run_tags(cfg.trial.parent_run_id))
    elif cfg.trial.parent_run_id:
        tags[protocol.TAG_PARENT_RUN] = str(cfg.trial.parent_run_id)
    if cfg.trial.role:  # the study's refit: a child of its parent, told apart
        tags.update(
            {
                protocol.TAG_ROLE: str(cfg.trial.role),
                protocol.TAG_STUDY_NAME: str(cfg.trial.study_name),
            }
        )
    return tags


@contextlib.contextmanager
def ended_on_error(mlrun: TrackedRun):
    """End the run (FAILED, or KILLED on an interrupt) if the block raises; else leave it open."""
    try:
        yield
    except BaseException as e:
        mlrun.close(e)
        raise


def _trial_hooks(mlrun: TrackedRun, link: TrialLink | None) -> list:
    """After each epoch: record; in a sweep, maybe prune."""
    epoch_hooks = [hooks.log_epoch(mlrun)]
    if link is not None:

        def end_pruned(state) -> None:  # a pruned trial is a normal end, marked by its tag
            mlrun.set_tags({protocol.TAG_TRIAL_STATE: "PRUNED", "pruned_at_epoch": state.epoch})
            mlrun.log_record(state.result, state.net)
            mlrun.end("FINISHED")

        epoch_hooks.append(prune(link, end_pruned))
    return epoch_hooks


_CLOSING = ("train_loss", "train_acc", "test_acc")  # train_ch6's: loss, train acc, test acc


def _print_seed_lines(result: TrainResult, device, level=logging.INFO, seeds=None) -> None:
    """train_ch6's two closing lines; with seeds, a line each and their mean ± std first."""
    final = result.final
    line = "loss %.3f, train acc %.3f, test acc %.3f"
    for seed, own in (seeds or {}).items():
        log.log(level, f"seed {seed}: {line}", *(own.final[k] for k in _CLOSING))
    if seeds:
        spread = [v for k in _CLOSING for v in (final[k], final[f"{k}_std"])]
        shown = line.replace("%.3f", "%.3f ± %.3f")
        log.log(level, f"mean of {len(seeds)} seeds: {shown}", *spread)
    else:
        log.log(level, line, *(final[k] for k in _CLOSING))
    log.log(level, "%.1f examples/sec on %s", result.examples_per_sec, device)
