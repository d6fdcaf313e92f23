"""The Hydra task: one training run, recorded in MLflow; returns the final test accuracy."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lenet_sweep import config, hooks, protocol, signals, tracking, tracking_store
from lenet_sweep.checkpoint import FILE as CHECKPOINT_FILE
from lenet_sweep.checkpoint import Checkpoint, identity
from lenet_sweep.data import Split, load_splits
from lenet_sweep.models import build
from lenet_sweep.train import TrainResult, train
from lenet_sweep.trial_link import TrialLink

log = logging.getLogger("lenet_sweep")
TAG_RESUMED_FROM = "lenet_sweep.resumed_from"  # a resume that could not continue its own run


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


def _run_name(cfg: DictConfig, params: dict) -> str:
    """mlflow.run_name, else the sweeper's trial name, else the config: `lenet sgd lr=0.9 ep=10`."""
    if cfg.mlflow.run_name or cfg.trial.name:
        return str(cfg.mlflow.run_name or cfg.trial.name)
    return f"{params['model']} {params['optimizer']} lr={cfg.lr:g} ep={cfg.epochs}"


def _tags(device, job: HydraJob, link: TrialLink | None, cfg: DictConfig) -> dict[str, str]:
    tags = {"device": str(device), "mlflow.source.name": "lenet_sweep"}
    if job.output_dir:
        tags["hydra.output_dir"] = job.output_dir
    if job.overrides:
        tags["hydra.overrides"] = " ".join(job.overrides)
    if commit := tracking.git_commit():
        tags["mlflow.source.git.commit"] = commit
    if link is not None:
        tags.update(link.run_tags(cfg.trial.parent_run_id))
    elif cfg.trial.parent_run_id:
        tags[protocol.TAG_PARENT_RUN] = str(cfg.trial.parent_run_id)
    return tags


@dataclass
class Job:
    """One run from config to records: `prepare` reads and checks everything and opens its MLflow
    run, `train_args` feeds a trainer, `complete` records the result. `run` does it for one run;
    the fused launcher (hydra_plugins/lenet_sweep_fused) prepares several and trains them
    together."""

    cfg: DictConfig
    device: object
    uri: str
    experiment_id: str
    hydra: HydraJob
    link: TrialLink | None
    train_split: Split
    test_split: Split
    net: object
    optimizer: object
    resume: Checkpoint | None
    mlrun: tracking.TrackedRun
    recorded: bool = False

    @classmethod
    def prepare(cls, cfg: DictConfig) -> Job:
        """Check, load and build; then open the MLflow run (RUNNING) and record the set-up."""
        config.validate(cfg)
        device = config.resolve_device(cfg.device)
        uri = tracking_store.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        # A copy of the data settings that the loading thread reads alone.
        data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
        with ThreadPoolExecutor(1, thread_name_prefix="splits") as pool:
            # On the CPU the data loads beside the store's opening: reading, hashing and
            # converting the idx files release the GIL, importing MLflow holds it (on 2 cores
            # both done 0.12-0.35 s sooner; a tiny run 0.07 s). On CUDA, unmeasured, it loads
            # after, as it did.
            splits = pool.submit(load_splits, data_cfg, device) if device.type == "cpu" else None
            experiment_id = tracking_store.prepare_experiment(uri, cfg.mlflow.experiment)
            tracking_store.repair_orphaned_runs(uri, experiment_id)
        hydra_job = HydraJob.current()
        link = TrialLink.current(hydra_job.sweeper_cfg)

        # Data, model and checkpoint first: bad input fails before any MLflow run exists.
        train_split, test_split = splits.result() if splits else load_splits(data_cfg, device)
        net, optimizer = build(cfg, device)
        resume, resume_path = Checkpoint.load(str(cfg.resume), cfg) if cfg.resume else (None, None)

        params = tracking.run_params(cfg, hydra_job.choices)
        run_name, tags = _run_name(cfg, params), _tags(device, hydra_job, link, cfg)
        run_id = resume and tracking.continuable(uri, resume.mlflow_run_id, params)
        if resume and not run_id:  # a finished run, or other settings (epochs): a new run
            tags[TAG_RESUMED_FROM] = resume.mlflow_run_id
        mlrun = tracking.TrackedRun(uri, experiment_id, run_name, tags, run_id)
        with _ended_on_error(mlrun):
            if link is not None:
                link.started(mlrun.run_id)
            if not run_id:
                mlrun.log_params(params)
                mlrun.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            if resume:
                mlrun.log_missing_epochs(resume.history)
                log.info("resuming %s after epoch %d", resume_path, resume.epoch)
        return cls(cfg, device, uri, experiment_id, hydra_job, link, train_split, test_split,
                   net, optimizer, resume, mlrun)  # fmt: skip

    def hooks(self) -> list:
        """This run's per-epoch hooks (`_epoch_hooks`)."""
        return _epoch_hooks(self.cfg, self.hydra, self.mlrun, self.link)

    def train_args(self) -> dict:
        """Everything a trainer takes after (net, optimizer, train split, test split)."""
        cfg = self.cfg
        return {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "progress": cfg.progress, "resume": self.resume, "hooks": self.hooks(),
                "autocast": config.autocast_dtype(cfg.precision)}  # fmt: skip

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

    def complete(self, result: TrainResult) -> dict[str, float]:
        """Record a finished training (unless `record` did), log its lines, mark the trial's
        state; the run itself ends when its TrackedRun closes."""
        if not self.recorded:
            self.record(result)
        log.info("MLflow run %s: %s", self.mlrun.run_id,
                 tracking_store.ui_link(self.uri, self.experiment_id))  # fmt: skip
        _print_seed_lines(result, self.device)
        if self.link is not None:
            self.mlrun.set_tags({protocol.TAG_TRIAL_STATE: "COMPLETE"})
            self.link.completed(result.train_time_s + result.eval_time_s)
        return result.metrics()


@contextlib.contextmanager
def _ended_on_error(mlrun: tracking.TrackedRun):
    """End the run (FAILED, or KILLED on an interrupt) if the block raises; else leave it open."""
    try:
        yield
    except BaseException as e:
        mlrun.close(e)
        raise


def trainer_for(cfg: DictConfig, device) -> Callable[..., TrainResult]:
    """The CUDA-graph trainer on CUDA (unless cuda_graph=false), else the eager loop."""
    if device.type == "cuda" and cfg.cuda_graph:
        from lenet_sweep.fused import train_graphed

        return train_graphed
    return train


def run(cfg: DictConfig) -> dict[str, float]:
    """Train once and record it; returns the final metrics (a sweep's objectives pick from them)."""
    job = Job.prepare(cfg)
    with signals.stop_on_signals(), job.mlrun:
        log.info("training on %s", job.device)
        trainer = trainer_for(cfg, job.device)
        try:
            result = trainer(job.net, job.optimizer, job.train_split, job.test_split,
                             **job.train_args())  # fmt: skip
        except Exception as e:
            job.failed(e)
            raise
        return job.complete(result)


def _epoch_hooks(cfg, job: HydraJob, mlrun: tracking.TrackedRun, link: TrialLink | None):
    """After each epoch, in order: stop if diverged, checkpoint, record, maybe prune."""
    epoch_hooks = [hooks.stop_on_divergence(cfg.divergence_threshold)]
    if job.output_dir:
        epoch_hooks.append(
            hooks.save_checkpoint(
                Path(job.output_dir) / CHECKPOINT_FILE,
                mlflow_run_id=mlrun.run_id,
                identity=identity(cfg),
            )  # fmt: skip
        )
    epoch_hooks.append(hooks.log_epoch(mlrun))
    if link is not None:

        def end_pruned(state) -> None:  # a pruned trial is a normal end, marked by its tag
            mlrun.set_tags({protocol.TAG_TRIAL_STATE: "PRUNED", "pruned_at_epoch": state.epoch})
            mlrun.log_record(state.result, state.net)
            mlrun.end("FINISHED")

        epoch_hooks.append(hooks.prune(link, end_pruned))
    return epoch_hooks


def _print_seed_lines(result: TrainResult, device) -> None:
    """train_ch6's two closing lines."""
    final = result.final
    log.info("loss %.3f, train acc %.3f, test acc %.3f",
             final["train_loss"], final["train_acc"], final["test_acc"])  # fmt: skip
    log.info("%.1f examples/sec on %s", result.examples_per_sec, device)
