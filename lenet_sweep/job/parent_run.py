"""A study's MLflow parent run (one per study, reopened when the sweep resumes), and the end of
the runs of trials whose worker died."""

from __future__ import annotations

import contextlib
import os

from lenet_sweep.process import HOST
from lenet_sweep.sweep import protocol
from lenet_sweep.tracking.backend import TAG_HOST, TAG_PID, client
from lenet_sweep.tracking.figures import log_study_plots
from lenet_sweep.tracking.model import model_id_of, register
from lenet_sweep.tracking.runs import Run


class SweepRun(Run):
    """A study's parent run: one per study, reopened when the sweep resumes."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        super().__init__(uri, run_id)
        self.experiment_id = experiment_id

    @classmethod
    def open(cls, uri: str, experiment_id: str, study, params: dict, owner: bool) -> SweepRun:
        """The study's parent run, created on first use (call under the study's ask lock). Its
        `owner` (the sweep's driver, not a fused worker) tags it with its host and pid, so that
        the next start anywhere ends it KILLED if this process dies (kill -9, out of memory)."""
        ours = {TAG_HOST: HOST, TAG_PID: str(os.getpid())} if owner else {}
        run_id = study.user_attrs.get(protocol.PARENT_RUN_ID)
        if run_id is not None:
            run = cls(uri, run_id, experiment_id)
            run.client.update_run(run_id, status="RUNNING")
            run.set_tags(ours)
            return run
        tags = {protocol.TAG_ROLE: "sweep", protocol.TAG_STUDY_NAME: study.study_name, **ours}
        created = client(uri).create_run(
            experiment_id, run_name=f"sweep {study.study_name}", tags=tags
        )
        run = cls(uri, created.info.run_id, experiment_id)
        study.set_user_attr(protocol.PARENT_RUN_ID, run.run_id)
        run.log_params(params)
        return run

    def record_best(
        self,
        study,
        best: list,
        results: dict,
        objectives: list[str],
        register_as: str | None = None,
    ) -> None:
        """The best trial (the Pareto front: several): metrics, tags naming its run and model,
        the results file and Optuna's plots; the best model registered as `register_as`."""
        run_ids = [t.user_attrs.get(protocol.MLFLOW_RUN_ID) for t in best]
        if len(objectives) == 1:
            self.log_metrics({"best_value": best[0].value})
            model_id = model_id_of(self.client, run_ids[0])
            tags = {
                "best_trial": best[0].number,
                "best_run_id": run_ids[0],
                "best_model_uri": f"runs:/{run_ids[0]}/model",
                "best_model_id": model_id,
                **{f"best.{k}": v for k, v in best[0].params.items()},
            }
            if register_as and model_id:
                registered = register(self.client, self.uri, register_as, run_ids[0], model_id)
                tags["registered_model"] = registered
        else:
            tags = {
                "pareto_trials": ",".join(str(t.number) for t in best),
                "pareto_run_ids": ",".join(map(str, run_ids)),
            }
        self.set_tags(tags)
        self.client.log_dict(self.run_id, results, "optimization_results.yaml")
        log_study_plots(self, study, objectives)


def kill_trial_runs(uri: str, trials) -> None:
    """End the MLflow runs of trials failed because their worker died (if still RUNNING), with
    the trial's fail_reason as their error tag."""
    mlflow_client = client(uri)
    for trial in trials:
        run_id = trial.user_attrs.get(protocol.MLFLOW_RUN_ID)
        why = trial.user_attrs.get(protocol.FAIL_REASON, "worker died")
        with contextlib.suppress(Exception):  # a run already gone or ended is left as it is
            if run_id and mlflow_client.get_run(run_id).info.status == "RUNNING":
                mlflow_client.set_tag(run_id, protocol.TAG_TRIAL_STATE, "FAIL (run again)")
                mlflow_client.set_tag(run_id, "error", why)
                mlflow_client.set_terminated(run_id, status="KILLED")
