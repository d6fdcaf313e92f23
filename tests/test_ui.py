"""What a researcher sees in the MLflow UI, rendered by a real headless Chromium (slow)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lenet_sweep import PROJECT_ROOT
from tests.conftest import SMALL, run_cli, runs_of

CHROMIUM = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]
DOCS = PROJECT_ROOT / "docs"  # where LENET_SWEEP_UPDATE_DOCS=1 keeps the screenshots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser(url: str, profile: Path, *extra: str) -> str:
    """The page's text once its scripts ran (--dump-dom), or what `extra` asks for."""
    exe = shutil.which("chromium")
    assert exe, "Chromium is missing: apt-get install chromium (.ci/run does)"
    out = subprocess.run(
        [exe, *CHROMIUM, f"--user-data-dir={profile}", *(extra or ["--dump-dom"]), url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", out.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


@pytest.fixture
def ui(tmp_path):
    """A store with a 3-trial sweep and a single run, served by `mlflow ui` on a free port."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*SMALL, "data.train_size=1024", "data.test_size=256", f"mlflow.tracking_uri={uri}"]
    sweep = run_cli(
        "-m",
        *common,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=s",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"hydra.sweep.dir={tmp_path / 'm'}",
        "lr=tag(log, interval(0.05, 2.0))",
        "epochs=range(1, 3)",
        # Both epochs values for sure (three random draws agree one time in four):
        # the compare page lists the params that differ.
        "hydra.sweeper.enqueue=[{lr: 0.1, epochs: 1}, {lr: 0.5, epochs: 2}]",
        "hydra.sweeper.register_model=lenet-best",
    )
    single = run_cli(*common, "epochs=2", f"hydra.run.dir={tmp_path / 'r'}")
    assert sweep.returncode == 0 and single.returncode == 0, sweep.stderr[-2000:] + single.stderr
    # The sweep made the store: MLflow's INFO lines on its tables are off (warnings are kept).
    assert "Creating initial MLflow database tables" not in sweep.stdout + sweep.stderr
    assert " INFO " not in sweep.stdout + sweep.stderr + single.stdout + single.stderr
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base, timeout=2)
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "mlflow ui did not start"
            time.sleep(0.5)
    try:
        yield base, uri, single
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_ui_opens_on_the_runs_and_compares_the_trials(ui, tmp_path):
    base, uri, single = ui
    _, runs = runs_of(uri, "lenet_sweep")
    experiment_id = runs[0].info.experiment_id
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    # The link each run prints opens the runs table (not the GenAI overview) in the project's
    # view: sorted by test_acc, which is the first column after the names; the Dataset filled.
    link = (
        f"/#/experiments/{experiment_id}/runs?viewStateShareKey=lenet_sweep"
        "&workflowType=machine_learning"
    )
    assert link in single.stdout
    size = "--window-size=1400,900"  # the table draws the columns that fit
    page = _browser(base + link, tmp_path / "profile-runs", size, "--dump-dom")
    assert "Run Name" in page and "Traces 0" not in page and "Detect Issues" not in page
    assert "sweep s" in page and "lenet sgd lr=0.9 ep=2 train_size=1024 test_size=256" in page
    assert "Sort: test_acc" in page and " test_acc val_acc train_acc lr epochs " in page
    trained = [r for r in runs if "test_acc" in r.data.metrics]
    shown = sorted(trained, key=lambda r: page.index(f" {r.info.run_name} "))  # top to bottom
    accuracies = [r.data.metrics["test_acc"] for r in shown]
    assert accuracies == sorted(accuracies, reverse=True)
    assert page.count("fashion_mnist training (1024) (c59f468a2f672dc8") == len(trained)
    _screenshot(base + link, tmp_path, "mlflow-runs.png", "1400,620")
    # The Models tab: each run's LoggedModel, from its run; the registered best one named.
    models_page = f"{base}/#/experiments/{experiment_id}/models?workflowType=machine_learning"
    models = _browser(models_page, tmp_path / "profile-m", size, "--dump-dom")
    assert models.count(" model Ready ") == len(trained)
    assert all(r.info.run_name in models for r in trained) and "lenet-best v1" in models
    _screenshot(models_page, tmp_path, "mlflow-models.png", "1700,500")
    # Compare the sweep's trials: names, the params that differ, val_acc as the plotted metric.
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in children]))
    compare = f"{base}/#/compare-runs?runs={ids}&experiments=%5B%22{experiment_id}%22%5D"
    page = _browser(compare, tmp_path / "profile-compare")
    assert "Comparing 3 Runs" in page
    for child in children:
        assert child.info.run_name in page and re.fullmatch(
            r"t00\d lr=\S+ ep=[12]", child.info.run_name
        )
    # the plotted metric: a trial's first, its objective (the validation accuracy)
    assert "Parameters: epochs lr" in page and "Metrics: val_acc" in page
    accuracies = [r.data.metrics["val_acc"] for r in children]  # the plot's val_acc axis ends
    assert f"{max(accuracies):.5f}" in page and f"{min(accuracies):.5f}" in page
    assert "optimizer.lr" not in page and "sha256" not in page  # no duplicates, no bookkeeping
    _screenshot(compare, tmp_path, "mlflow-compare.png", "1400,1100")


def _screenshot(url: str, tmp_path: Path, name: str, size: str = "1400,700") -> None:
    """The page as a PNG; LENET_SWEEP_UPDATE_DOCS=1 keeps it in docs/ (the README's figures)."""
    shot = tmp_path / name
    _browser(url, tmp_path / f"profile-{name}", f"--screenshot={shot}", f"--window-size={size}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LENET_SWEEP_UPDATE_DOCS") == "1":
        shutil.copy(shot, DOCS / name)
