"""The built wheel in a fresh virtual environment, started from a directory of the user's own:
the configs come with the package, outputs land in ./outputs (README, "Install")."""

from __future__ import annotations

import shutil
import subprocess
import sys

import optuna
import pytest

from lenet_sweep import PROJECT_ROOT
from tests.conftest import SMALL, runs_of

pytestmark = pytest.mark.slow


def _wheel_from_sdist(folder) -> list:
    """The sdist built from a copy of the checkout's files, then the wheel built from the sdist
    (so both must carry conf/), all in `folder`: nothing is built in the checkout."""
    source, dist = folder / "source", folder / "dist"
    git = ["git", "ls-files", "-co", "--exclude-standard"]
    listed = subprocess.run(git, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
    listed = listed.stdout.split()
    for name in listed:
        if (PROJECT_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, source / name)
    build = f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True)
    [sdist] = dist.glob("*.tar.gz")
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, sdist]
    subprocess.run(wheel, check=True, cwd=folder)
    return list(dist.glob("*.whl"))


@pytest.fixture
def venv(tmp_path):
    """A new venv holding the wheel and its dependencies (torch from this machine's wheels)."""
    wheels, env_dir = _wheel_from_sdist(tmp_path), tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", env_dir], check=True)
    python = env_dir / "bin" / "python"
    torch = ["torch==2.14.1", "torchvision==0.29.1"]  # the README's versions
    install = [python, "-m", "pip", "install", "-q", *torch, *wheels]
    subprocess.run(install, check=True, capture_output=True, timeout=1200)
    yield python
    shutil.rmtree(env_dir, ignore_errors=True)  # ~6 GB


def test_the_wheel_runs_and_sweeps_from_another_directory(venv, tmp_path):
    home = tmp_path / "project"
    home.mkdir()
    env = {"PATH": f"{venv.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def lenet_sweep(*args: str):
        command = [venv, "-m", "lenet_sweep", *args]
        return subprocess.run(command, cwd=home, env=env, capture_output=True, text=True)

    single = lenet_sweep(*SMALL)
    assert single.returncode == 0, single.stderr[-2000:]
    assert "loss " in single.stdout and "examples/sec on cpu" in single.stdout
    outputs = home / "outputs"
    assert len(list((outputs / "runs").glob("*/*/checkpoint.pt"))) == 1
    sweep = lenet_sweep("-m", *SMALL, "hydra.sweeper.n_trials=2", "hydra.sweeper.params.epochs=1")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    study = optuna.load_study(study_name="lenet_sweep", storage=f"sqlite:///{outputs}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert (outputs / "multirun" / "lenet_sweep" / "optimization_results.yaml").is_file()
    _, runs = runs_of(f"sqlite:///{outputs}/mlflow.db", "lenet_sweep")
    assert len(runs) == 4  # the single run, the sweep's parent and its two trials
    assert list(tmp_path.glob("venv/lib/*/site-packages/outputs")) == []  # none beside the code
