"""A trained net logged as an MLflow model (mlflow.pytorch's own format, loadable from the run),
and the two MLflow workarounds that logging needs, each isolated in one function."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading


def log_model(client, run_id: str, net) -> None:
    """The trained net under the run's `model/`: mlflow.pytorch.load_model("runs:/<id>/model")."""
    import torch

    mlflow_pytorch = _mlflow_pytorch_without_lightning()
    # Pinned requirements skip MLflow's import-tracing inference (seconds per run); pickle,
    # because the default pt2 format needs an example input and a traced graph.
    torch_req = f"torch=={torch.__version__.split('+')[0]}"
    quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning: we load our own nets
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with tempfile.TemporaryDirectory() as tmp, _requirements_unchecked():
            mlflow_pytorch.save_model(
                net, f"{tmp}/model", serialization_format="pickle", pip_requirements=[torch_req]
            )
            client.log_artifacts(run_id, f"{tmp}/model", "model")
    finally:
        quiet.level = level


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


_CHECK_LOCK = threading.Lock()  # launchers record from several threads


@contextlib.contextmanager
def _requirements_unchecked():
    """Saving a model without MLflow's check of its pip requirements against what is installed.

    Workaround: the check maps every installed distribution's files to modules (seconds on a
    large environment) to compare versions; the requirement we write is the running torch's own,
    met by construction. It can go when save_model takes a switch for the check, or when models
    are logged with MLflow 3's LoggedModel API if that skips it.
    """
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
