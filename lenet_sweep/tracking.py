"""MLflow runs: a training run's record (TrackedRun) and a sweep's parent run (SweepRun).

Both write through MlflowClient (no global fluent state, so they are safe in launcher workers),
mask credentials in everything they write, and end with an explicit status.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping

from omegaconf import DictConfig

from lenet_sweep import PROJECT_ROOT, painter, protocol
from lenet_sweep.figures import log_study_plots
from lenet_sweep.tracking_store import HOST, TAG_HOST, TAG_PID, client
from lenet_sweep.urls import mask_url

log = logging.getLogger("lenet_sweep.sweep")


class Run:
    """Writes to one existing MLflow run."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id
        self.ended = False

    def end(self, status: str) -> None:
        """End the run now with `status` (FINISHED, FAILED, KILLED)."""
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in as_logged(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        )

    def set_tags(self, tags: Mapping[str, object]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, mask_url(str(v))) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=tags)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, mask_url(text), path)

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, folder)


class TrackedRun(Run):
    """One training run. As a context manager it never stays RUNNING after a Python-level exit:
    leaving normally ends FINISHED, an interrupt KILLED, any other exception FAILED, unless the
    run was ended explicitly first (a pruned trial ends FINISHED while TrialPruned propagates).
    """

    def __init__(self, uri, experiment_id, run_name, tags: dict, run_id: str | None = None):
        tags = {**tags, TAG_HOST: HOST, TAG_PID: str(os.getpid())}
        if run_id is None:
            tags = {k: mask_url(str(v)) for k, v in tags.items()}  # overrides may carry a password
            mlflow_run = client(uri).create_run(
                experiment_id, run_name=mask_url(run_name), tags=tags
            )
            super().__init__(uri, mlflow_run.info.run_id)
        else:  # resume into the same run: it is running again, the interruption is over
            super().__init__(uri, run_id)
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags)
            with contextlib.suppress(Exception):  # no error tag: nothing to remove
                self.client.delete_tag(run_id, "error")

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(exc)
        return False

    def close(self, error: BaseException | None = None) -> None:
        """End the run for how its work ended (unless ended already): FINISHED without an
        error, KILLED on an interrupt, else FAILED with the error as a tag."""
        if self.ended:
            return
        if error is not None:
            self.set_tags({"error": f"{type(error).__name__}: {mask_url(str(error))}"[:5000]})
        if error is None:
            self.end("FINISHED")
        elif isinstance(error, KeyboardInterrupt | SystemExit):
            self.end("KILLED")
        else:
            self.end("FAILED")

    def log_epoch(self, stats: dict) -> None:
        """One epoch's metrics at step = epoch."""
        self.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=stats["epoch"])

    def log_missing_epochs(self, history: list[dict]) -> None:
        """A kill between checkpoint and metric write loses an epoch's metrics: write them now."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "test_acc")}
        for stats in history:
            if stats["epoch"] not in logged:
                self.log_epoch(stats)

    def log_model(self, net) -> None:
        """The trained net under `model/`: mlflow.pytorch.load_model("runs:/<id>/model")."""
        import tempfile

        import torch

        mlflow_pytorch = _mlflow_pytorch()

        # Pinned requirements skip MLflow's import-tracing inference (seconds per run); pickle,
        # because the default pt2 format needs an example input and a traced graph.
        torch_req = f"torch=={torch.__version__.split('+')[0]}"
        quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning: we load our own nets
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with tempfile.TemporaryDirectory() as tmp, _own_versions_unchecked():
                mlflow_pytorch.save_model(net, f"{tmp}/model", serialization_format="pickle",
                                          pip_requirements=[torch_req])  # fmt: skip
                self.client.log_artifacts(self.run_id, f"{tmp}/model", "model")
        finally:
            quiet.level = level

    def log_record(self, result, net) -> None:
        """What a run leaves besides its epochs: the totals, the training curves and the model
        (a TrainResult and its net). The curves are drawn elsewhere (lenet_sweep.painter) while
        the totals and the model are written."""
        import tempfile

        totals = {"examples_per_sec": result.examples_per_sec,
                  "train_time_s": result.train_time_s, "epochs_run": len(result.history)}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "training_curves.png")
            curves = painter.drawing(result.history, path) if result.history else None
            with curves or contextlib.nullcontext():
                self.log_metrics(totals)
                self.log_model(net)
            if curves is not None:
                self.log_artifact(path)


def _mlflow_pytorch():
    """mlflow.pytorch, imported without pytorch_lightning: where Lightning is installed (the GPU
    image), mlflow.pytorch imports it for an autolog callback, 3 s of a run's start-up; saving a
    plain nn.Module needs none of it (mlflow.pytorch skips the callback on ImportError)."""
    import sys

    blocked = "pytorch_lightning" not in sys.modules
    if blocked:
        sys.modules["pytorch_lightning"] = None  # makes `import pytorch_lightning` ImportError
    try:
        import mlflow.pytorch
    finally:
        if blocked:
            del sys.modules["pytorch_lightning"]
    return mlflow.pytorch


_CHECK_LOCK = threading.Lock()


@contextlib.contextmanager
def _own_versions_unchecked():
    """Saving a model without MLflow's check of its pip requirements against the installed
    packages. To map each package to its module the check scans every installed distribution's
    file list (importlib_metadata.packages_distributions): 0.45-0.6 s of every process that logs
    a model. The requirements we write are the running torch's and MLflow's own versions, met by
    construction, so the check could only ever pass. (Held under a lock: launchers record from
    several threads.)"""
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    with _CHECK_LOCK:
        check = getattr(environment, name, None)
        if check is None:  # another MLflow: it keeps its own check
            yield
            return
        setattr(environment, name, lambda requirements: None)
        try:
            yield
        finally:
            setattr(environment, name, check)


class SweepRun(Run):
    """A study's parent run: one per study, reopened when the sweep resumes."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        super().__init__(uri, run_id)
        self.experiment_id = experiment_id

    @classmethod
    def open(cls, uri: str, experiment_id: str, study, params: dict) -> SweepRun:
        """The study's parent run, created on first use (call under the study's ask lock)."""
        run_id = study.user_attrs.get(protocol.PARENT_RUN_ID)
        if run_id is not None:
            run = cls(uri, run_id, experiment_id)
            run.client.update_run(run_id, status="RUNNING")
            return run
        tags = {protocol.TAG_ROLE: "sweep", protocol.TAG_STUDY_NAME: study.study_name}
        created = client(uri).create_run(
            experiment_id, run_name=f"sweep {study.study_name}", tags=tags
        )
        run = cls(uri, created.info.run_id, experiment_id)
        study.set_user_attr(protocol.PARENT_RUN_ID, run.run_id)
        run.log_params(params)
        return run

    def record_best(self, study, best: list, results: dict, objectives: list[str]) -> None:
        """The best trial (the Pareto front: several): metrics, tags naming its run and model,
        the results file and Optuna's plots."""
        run_ids = [t.user_attrs.get(protocol.MLFLOW_RUN_ID) for t in best]
        if len(objectives) == 1:
            self.log_metrics({"best_value": best[0].value})
            tags = {"best_trial": best[0].number, "best_run_id": run_ids[0],
                    "best_model_uri": f"runs:/{run_ids[0]}/model",
                    **{f"best.{k}": v for k, v in best[0].params.items()}}  # fmt: skip
        else:
            tags = {"pareto_trials": ",".join(str(t.number) for t in best),
                    "pareto_run_ids": ",".join(map(str, run_ids))}  # fmt: skip
        self.set_tags(tags)
        self.client.log_dict(self.run_id, results, "optimization_results.yaml")
        log_study_plots(self, study, objectives)


class NoSweepRun:
    """The parent run of a sweep whose MLflow part is off (hydra.sweeper.mlflow=false)."""

    run_id = experiment_id = None

    def set_tags(self, tags) -> None:
        pass

    def end(self, status: str) -> None:
        pass

    def record_best(self, *args) -> None:
        pass


def kill_trial_runs(uri: str, trials) -> None:
    """End the MLflow runs of trials failed because their worker died (if still RUNNING)."""
    mlflow_client = client(uri)
    for trial in trials:
        run_id = trial.user_attrs.get(protocol.MLFLOW_RUN_ID)
        with contextlib.suppress(Exception):  # a run already gone or ended is left as it is
            if run_id and mlflow_client.get_run(run_id).info.status == "RUNNING":
                mlflow_client.set_terminated(run_id, status="KILLED")
                mlflow_client.set_tag(run_id, protocol.TAG_TRIAL_STATE, "FAIL (worker died)")


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"}, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_params(cfg: DictConfig, choices: Mapping[str, str]) -> dict[str, object]:
    """What a researcher sweeps and compares, each once: the knobs, the model and optimizer by
    name with their settings (not `optimizer.lr`, that is `lr`), the data by name with the slice
    sizes used. Bookkeeping (checksums, paths, trial.*) stays in config.yaml and the tags."""
    knobs = ("lr", "epochs", "batch_size", "seed", "precision")
    params: dict[str, object] = {k: cfg[k] for k in knobs}
    for group in ("model", "optimizer"):
        params[group] = choices.get(group) or str(cfg[group]._target_).rsplit(".", 1)[-1].lower()
        settings = {k: v for k, v in cfg[group].items() if not k.startswith("_") and k != "lr"}
        params.update({f"{group}.{k}": v for k, v in settings.items()})
    params["data"] = cfg.data.name
    params["data.train_size"] = cfg.data.train_size or cfg.data.num_train
    params["data.test_size"] = cfg.data.test_size or cfg.data.num_test
    return params


def as_logged(params: Mapping[str, object]) -> dict[str, str]:
    """Params as MLflow keeps them: text, credentials masked, cut at MLflow's 6000 characters."""
    return {k: str(mask_url(str(v)))[:6000] for k, v in params.items()}


def continuable(uri: str, run_id: str | None, params: dict[str, str]) -> str | None:
    """`run_id` when a resume may continue that run: it is not FINISHED and was logged with the
    same params (MLflow params cannot change). Else None: the resume becomes a new run."""
    try:
        run = client(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or another store
        return None
    same = run.data.params == as_logged(params)
    return run_id if same and run.info.status != "FINISHED" else None


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit, read once per process: the code a process runs is what it
    imported (a fused sweep asks once per trial)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
