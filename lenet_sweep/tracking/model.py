"""A trained net logged as an MLflow 3 LoggedModel (mlflow.pytorch's own log_model: the
experiment's Models tab lists it, linked to its run and metrics; loadable from the run), and the
MLflow workarounds that logging needs, each isolated in one function."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading

NAME = "model"  # mlflow.pytorch.load_model("runs:/<run id>/model")
_LOCK = threading.Lock()  # launchers record from several threads; the fluent URI is global


def log_model(client, uri: str, run_id: str, net, step: int) -> str:
    """Log `net` as the run's LoggedModel, its metrics at `step` linked to it; its model id."""
    import mlflow
    import torch

    mlflow_pytorch = _mlflow_pytorch_without_lightning()
    model = _logged_model_in_the_runs_experiment(client, run_id)
    # Pinned requirements skip MLflow's import-tracing inference (seconds per run); pickle,
    # because the default pt2 format needs an example input and a traced graph.
    torch_req = f"torch=={torch.__version__.split('+')[0]}"
    quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning: we load our own nets
    with _LOCK, _requirements_unchecked():
        level, quiet.level = quiet.level, logging.ERROR
        mlflow.set_tracking_uri(uri)  # log_model writes through the fluent API's client
        try:
            mlflow_pytorch.log_model(
                net, name=NAME, model_id=model.model_id, run_id=run_id, step=step,
                serialization_format="pickle", pip_requirements=[torch_req],
            )  # fmt: skip
        finally:
            quiet.level = level
    return model.model_id


def model_id_of(client, run_id: str) -> str | None:
    """The id of the LoggedModel a run logged (its outputs), or None."""
    outputs = client.get_run(run_id).outputs
    return outputs.model_outputs[-1].model_id if outputs and outputs.model_outputs else None


def register(client, uri: str, name: str, run_id: str, model_id: str) -> str:
    """The model in MLflow's Model Registry as a version of `name` (made on first use), once per
    model: `name/<version>`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(name)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return f"{name}/{version.version}"  # a rerun of the sweep with the same best
    with _LOCK:
        mlflow.set_tracking_uri(uri)  # a sqlite registry reads models:/ through the fluent URI
        version = client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
    # As mlflow.register_model links them (the Models tab's "Registered models"), without its
    # prints: the version on the LoggedModel's tag.
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    linked.append({"name": name, "version": version.version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    return f"{name}/{version.version}"


def _logged_model_in_the_runs_experiment(client, run_id: str):
    """A new LoggedModel of the run, in the run's experiment, for log_model(model_id=...).

    Workaround: log_model(run_id=...) alone creates its LoggedModel in the active experiment,
    the default one ("0") when none is set, not the run's: its fallback to the run's experiment
    (mlflow/mlflow#15491) is reached only without any active experiment id, which never happens.
    It can go when log_model(run_id=...) creates the model in the run's experiment.
    """
    run = client.get_run(run_id)
    return client.create_logged_model(
        run.info.experiment_id, name=NAME, source_run_id=run_id, params=run.data.params
    )


def _mlflow_pytorch_without_lightning():
    """mlflow.pytorch, imported with `pytorch_lightning` unimportable.

    Workaround: where Lightning is installed, importing mlflow.pytorch imports it for an autolog
    callback (seconds of start-up) that saving a plain nn.Module never uses; mlflow.pytorch skips
    the callback on ImportError. It can go when mlflow.pytorch imports Lightning lazily.
    """
    blocked = "pytorch_lightning" not in sys.modules
    if blocked:
        sys.modules["pytorch_lightning"] = None  # makes `import pytorch_lightning` ImportError
    try:
        import mlflow.pytorch
    finally:
        if blocked:
            del sys.modules["pytorch_lightning"]
    return mlflow.pytorch


@contextlib.contextmanager
def _requirements_unchecked():
    """Saving a model without MLflow's check of its pip requirements against what is installed.

    Workaround: the check maps every installed distribution's files to modules (seconds on a
    large environment) to compare versions; the requirement we write is the running torch's own,
    met by construction. MLflow 3's log_model runs it too (its cost: docs/performance.md). It can
    go when log_model takes a switch for the check. Called under _LOCK.
    """
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    check = getattr(environment, name, None)
    if check is None:  # another MLflow: it keeps its own check
        yield
        return
    setattr(environment, name, lambda requirements: None)
    try:
        yield
    finally:
        setattr(environment, name, check)
