"""MLflow runs: a training run's record (TrackedRun) and the writes any run takes (Run).

They write through MlflowClient (no global fluent state, so they are safe in launcher workers),
mask credentials in everything they write, and end with an explicit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping

from lenet_sweep.errors import mask_url
from lenet_sweep.process import HOST
from lenet_sweep.tracking.backend import TAG_HOST, TAG_PID, client
from lenet_sweep.tracking.figures import curves_figure
from lenet_sweep.tracking.model import log_model
from lenet_sweep.tracking.params import as_logged


class Run:
    """Writes to one existing MLflow run."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.client, self.run_id = uri, client(uri), run_id
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
        if error is None:
            self.end("FINISHED")
            return
        try:
            self.set_tags({"error": f"{type(error).__name__}: {mask_url(str(error))}"[:5000]})
            self.end("KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED")
        except Exception:  # noqa: BLE001 - the store is full or away: the error in flight is
            pass  # what matters; the run is ended KILLED by the next start (repair_orphaned_runs)

    def log_epoch(self, stats: dict) -> None:
        """One epoch's metrics at step = epoch."""
        self.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=stats["epoch"])

    def log_missing_epochs(self, history: list[dict]) -> None:
        """A kill between checkpoint and metric write loses an epoch's metrics: write them now."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "test_acc")}
        for stats in history:
            if stats["epoch"] not in logged:
                self.log_epoch(stats)

    def log_datasets(self, name: str, splits: Mapping[str, object]) -> None:
        """The data as the run's inputs (the runs table's Dataset column), one per context
        (`training`, `evaluation`: a core.data.Split each): its size, folder and checksums. The
        digest is the images' SHA-256 cut to the 36 characters MLflow's store keeps."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for context, split in splits.items():
            sums = {f"{kind}_sha256": digest for kind, digest in split.sha256.items()}
            dataset = Dataset(
                name=f"{name} {context} ({len(split)})",
                digest=split.sha256.get("images", "")[:36] or "unchecked",
                source_type="local",
                source=json.dumps({"uri": split.source}),
                profile=json.dumps({"num_rows": len(split), **sums}),
            )
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(self, net, step: int) -> str:
        """The trained net as the run's LoggedModel `model` (the metrics at `step` linked to it):
        mlflow.pytorch.load_model("runs:/<id>/model"). Returns its model id."""
        return log_model(self.client, self.uri, self.run_id, net, step)

    def log_record(self, result, net) -> None:
        """What a run leaves besides its epochs: the totals, the training curves and the model
        (a TrainResult and its net)."""
        totals = {
            "examples_per_sec": result.examples_per_sec,
            "train_time_s": result.train_time_s,
            "epochs_run": len(result.history),
        }
        self.log_metrics(totals)
        self.log_model(net, step=len(result.history))
        if result.history:
            figure = curves_figure(result.history)
            self.client.log_figure(self.run_id, figure, "training_curves.png")
