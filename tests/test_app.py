"""The Hydra task and the CLI: what a user runs, read back from the MLflow store."""

import json
import math
import subprocess
import sys

import pytest

from lenet_sweep import PROJECT_ROOT
from lenet_sweep.job import run as app
from tests.conftest import SMALL, model_of, run_cli, runs_of


def test_run_records_everything_in_mlflow(make_cfg, mlflow_uri, experiment):
    metrics = app.run(make_cfg("epochs=2", "lr=0.5"))
    client, runs = runs_of(mlflow_uri, experiment)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lenet sgd lr=0.5 ep=2"  # named from its config
    # the knobs a researcher compares, each once; no bookkeeping
    assert run.data.params == {
        "lr": "0.5",
        "epochs": "2",
        "batch_size": "256",
        "seed": "42",
        "precision": "fp32",
        "seeds": "1",
        "model": "lenet",
        "model.activation": "sigmoid",
        "model.pool": "avg",
        "model.num_classes": "10",
        "optimizer": "sgd",
        "data": "fashion_mnist",
        "data.train_size": "2048",
        "data.test_size": "512",
    }
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"  # the MLflow UI opens it on the runs table, not GenAI
    )
    for key in ("train_loss", "train_acc", "test_acc", "test_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2]
    test_acc = client.get_metric_history(run.info.run_id, "test_acc")[-1].value
    assert metrics["test_acc"] == pytest.approx(test_acc) and isinstance(metrics["test_acc"], float)
    assert metrics["train_time_s"] == pytest.approx(run.data.metrics["train_time_s"])
    assert run.data.metrics["examples_per_sec"] > 0 and run.data.metrics["train_time_s"] > 0
    assert run.data.tags["device"] == "cpu"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "training_curves.png"} <= artifacts
    # The data as the run's inputs: the runs table's Dataset column, digests the checked SHA-256.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["evaluation", "training"]
    train = inputs["training"]
    sha = "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"  # train images
    assert train.name == "fashion_mnist training (2048)" and train.digest == sha[:36]
    assert json.loads(train.profile) == {
        "num_rows": 2048, "images_sha256": sha,
        "labels_sha256": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    }  # fmt: skip
    assert inputs["evaluation"].name == "fashion_mnist evaluation (512)"
    # artifacts live beside the sqlite store, whatever the cwd
    store_dir = mlflow_uri[len("sqlite:///") :].rsplit("/", 1)[0]
    assert run.info.artifact_uri.startswith(f"file://{store_dir}/mlartifacts/")
    png = client.download_artifacts(run.info.run_id, "training_curves.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_each_run_logs_a_model_that_loads_with_its_accuracy(make_cfg, mlflow_uri, experiment):
    import mlflow
    import mlflow.pytorch
    import torch

    from lenet_sweep.core.data import load_split
    from lenet_sweep.core.train import evaluate_accuracy

    cfg = make_cfg("epochs=2")
    metrics = app.run(cfg)
    client, [run] = runs_of(mlflow_uri, experiment)
    mlflow.set_tracking_uri(mlflow_uri)
    net = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    test = load_split(cfg.data, train=False, device=torch.device("cpu"))
    assert evaluate_accuracy(net, test, 256) == metrics["test_acc"] == run.data.metrics["test_acc"]
    # MLflow 3: a LoggedModel of the run, in its experiment, with the last epoch's metrics.
    model, _ = model_of(client, run)
    assert model.status == "READY" and model.experiment_id == run.info.experiment_id
    linked = {m.key: m.value for m in model.metrics}
    assert linked["test_acc"] == metrics["test_acc"] and {"train_loss", "train_acc"} <= set(linked)
    assert model.params["lr"] == run.data.params["lr"]
    assert mlflow.pytorch.load_model(f"models:/{model.model_id}") is not None


def test_logging_a_model_skips_mlflows_scan_of_installed_packages(
    mlflow_uri, experiment, monkeypatch
):
    from importlib.metadata import version

    import mlflow.artifacts
    from mlflow.utils import environment, requirements_utils

    from lenet_sweep.core.models import lenet
    from lenet_sweep.tracking import backend as tracking_backend
    from lenet_sweep.tracking.runs import TrackedRun

    # MLflow fills this map (every installed distribution's files, ~0.5 s) on its first check.
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    check = environment.warn_dependency_requirement_mismatches
    exp = tracking_backend.prepare_experiment(mlflow_uri, experiment)
    with TrackedRun(mlflow_uri, exp, "model only", {}, None) as run:
        run.log_model(lenet(), step=1)
    assert requirements_utils._MODULES_TO_PACKAGES is None  # the scan never ran
    assert environment.warn_dependency_requirement_mismatches is check  # MLflow's own, restored
    path = mlflow.artifacts.download_artifacts(
        f"runs:/{run.run_id}/model/requirements.txt", tracking_uri=mlflow_uri
    )
    with open(path) as f:
        pins = f.read().split()
    assert pins == [f"mlflow=={version('mlflow')}", f"torch=={version('torch')}"]


def test_run_that_raises_ends_failed(make_cfg, mlflow_uri, experiment, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app, "train", boom)
    with pytest.raises(RuntimeError):
        app.run(make_cfg())
    _, runs = runs_of(mlflow_uri, experiment)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"] == "RuntimeError: disk on fire"


def test_a_data_error_comes_before_any_run_and_a_store_error_before_it(
    make_cfg, mlflow_uri, experiment, tmp_path
):
    from lenet_sweep.errors import UserError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty: missing train-images-idx3-ubyte"):
        app.Job.prepare(make_cfg("device=cpu", f"data.root={empty}"))
    assert runs_of(mlflow_uri, experiment)[1] == []
    bad_store = f"sqlite:///{tmp_path / 'no' / 'dir'}/x.db"
    with pytest.raises(UserError, match="MLflow store .* does not exist"):
        app.Job.prepare(
            make_cfg("device=cpu", f"data.root={empty}", f"mlflow.tracking_uri={bad_store}")
        )


def test_config_composition_and_overrides(make_cfg):
    cfg = make_cfg()
    assert (cfg.lr, cfg.batch_size, cfg.device) == (0.9, 256, "cpu")
    assert cfg.model.activation == "sigmoid" and cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.lr == 0.9
    cfg = make_cfg("model=lenet_relu", "optimizer=adam", "lr=0.001")
    assert cfg.model.pool == "max" and cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 0.001  # ${lr} follows the top-level knob


def test_cli_prints_seed_lines_and_returns_zero(tmp_path, mlflow_uri, experiment):
    proc = run_cli(
        *SMALL,
        "epochs=2",
        f"hydra.run.dir={tmp_path}",
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={experiment}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr  # piped: epoch lines, no progress-bar spam
    out = proc.stdout
    assert "training on cpu" in out
    assert "epoch 2/2: train loss" in out
    lines = out.strip().splitlines()
    loss_line, speed_line = lines[-2], lines[-1]
    assert (
        loss_line.startswith("loss ") and ", train acc " in loss_line and ", test acc " in loss_line
    )
    assert speed_line.endswith(" examples/sec on cpu")
    assert float(speed_line.split()[0]) > 0
    _, runs = runs_of(mlflow_uri, experiment)
    assert runs[0].data.tags["hydra.output_dir"] == str(tmp_path)
    # Named by what the overrides change (train_size, test_size); paths and switches left out.
    assert runs[0].info.run_name == "lenet sgd lr=0.9 ep=2 train_size=2048 test_size=512"
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    final = float(loss_line.rsplit(" ", 1)[1])
    assert math.isclose(final, runs[0].data.metrics["test_acc"], abs_tol=6e-4)


def test_run_names_show_what_differs_from_the_defaults(make_cfg):
    from lenet_sweep import config

    cfg = make_cfg("data=mnist", "data.train_size=256", "batch_size=64", "lr=0.25", "seed=7")
    overrides = ["data=mnist", "data.train_size=512", "data.train_size=256", "batch_size=64",
                 "lr=0.25", "+seed=7", "device=cpu", "progress=false", "mlflow.experiment=x"]  # fmt: skip
    assert config.run_name(cfg, "lenet", "adam", overrides) == (
        "lenet adam lr=0.25 ep=1 data=mnist train_size=256 bs=64 seed=7"
    )
    assert config.run_name(cfg, "lenet", "sgd", []) == "lenet sgd lr=0.25 ep=1"


def test_cli_cfg_job_and_help():
    proc = run_cli("--cfg", "job", "lr=0.3")
    assert (
        proc.returncode == 0
        and "lr: 0.3" in proc.stdout
        and "_target_: torch.optim.SGD" in proc.stdout
    )
    proc = run_cli("--help", "lr=0.3")
    assert proc.returncode == 0 and proc.stderr == ""
    out = proc.stdout
    for group in ("model: lenet, lenet_relu", "optimizer: adam, sgd", "data: fashion_mnist, mnist"):
        assert group in out
    # Every knob with its value, meaning and range, from the schema (one source).
    from lenet_sweep import config

    rows = [*config.knobs(config.RunConfig).items(),
            *config.knobs(config.LenetOptunaSweeperConf, "hydra.sweeper.").items()]  # fmt: skip
    for key, rule in rows:
        assert f"\n  {key}=" in out and f"{rule.help} ({rule.allowed})" in out, key
    assert "\n  lr=0.3 " in out and "\n  hydra.sweeper.n_trials=20 " in out
    for launcher in ("basic", "fused", "slurm", "ray_cluster"):
        assert f"\n  {launcher} " in out
    assert "hydra/sweeper/sampler={tpe,random," in out and "pruner={none,median," in out
    assert out.split("== Examples ==")[1].count("python -m lenet_sweep") >= 3
    for internal in ("powered by Hydra", "sha256", "c59f468a", "trial:", "_target_"):
        assert internal not in out


def test_help_into_a_closed_pipe_ends_quietly():
    # `true` reads nothing and is gone before the page is written: the write meets EPIPE.
    command = f"set -o pipefail; {sys.executable} -m lenet_sweep --help | true"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 141 and proc.stderr == ""  # 128 + SIGPIPE, as a shell's commands


def test_training_curves_show_every_epoch_even_one():
    from lenet_sweep.tracking.figures import curves_figure

    one = curves_figure([{"epoch": 1, "train_loss": 2.3, "train_acc": 0.1, "test_acc": 0.1}])
    ax = one.axes[0]
    assert [line.get_marker() for line in ax.get_lines()] == ["o", "o", "o"]  # a point shows
    assert ax.get_xlim() == (0.5, 1.5)
    many = curves_figure(
        [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "test_acc": 0.5} for e in (1, 2, 3)]
    )
    assert many.axes[0].get_xlim() == (1, 3)
    assert [len(line.get_xdata()) for line in many.axes[0].get_lines()] == [3, 3, 3]


@pytest.mark.parametrize(
    ("leave", "rc", "out", "err"),
    [
        ("0", 0, "out|atexit ran|", ""),
        ("3", 3, "out|atexit ran|", ""),
        ("'no such thing'", 1, "out|atexit ran|", "no such thing\n"),
        ("None", 0, "out|thread done|atexit ran|", ""),
    ],
)
def test_the_cli_leaves_as_sys_exit_would(leave, rc, out, err):
    """The CLI skips the interpreter's teardown (about 1 s) but not what an exit must do: the exit
    code, atexit handlers, flushed output; a running non-daemon thread is waited for."""
    import subprocess
    import sys

    code = f"""
import atexit, sys, threading, time
from lenet_sweep.speed import leave as _leave
atexit.register(lambda: print("atexit ran", end="|"))
print("out", end="|")
if {leave!r} == "None":
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", end="|"))).start()
_leave({leave})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (rc, out, err)
