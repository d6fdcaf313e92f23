"""Run dirs, study names and study files, each on real stores: runs started in the same second get
a dir each, a study name is a plain name (it names a folder), a fused group size below one and a
damaged Optuna file are refused, warm starts that fill the budget run."""

from __future__ import annotations

import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from lenet_sweep import CONFIG_DIR
from tests.conftest import SMALL, run_cli, run_together, runs_of

TINY = ["data.train_size=256", "data.test_size=256", "progress=false", "device=cpu"]


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_a_run_dir_each(tmp_path, mlflow_uri, experiment):
    # The default run dir's pattern, under a temporary root instead of the project's outputs/.
    default = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["hydra"]["run"]["dir"]
    assert default.endswith("${now:%H-%M-%S}-${pid:}")
    pattern = f"hydra.run.dir={tmp_path}/runs/" + "${now:%H-%M-%S}-${pid:}"
    common = [*TINY, "epochs=1", pattern,
              f"mlflow.tracking_uri={mlflow_uri}", f"mlflow.experiment={experiment}"]  # fmt: skip
    results = run_together(*[[*common, f"seed={seed}"] for seed in (1, 2, 3, 4)])
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 4
    seeds = sorted(OmegaConf.load(d / ".hydra" / "config.yaml").seed for d in dirs)
    assert seeds == [1, 2, 3, 4] and all((d / "checkpoint.pt").is_file() for d in dirs)
    _, runs = runs_of(mlflow_uri, experiment)
    assert sorted(r.data.tags["hydra.output_dir"] for r in runs) == [str(d) for d in dirs]


@pytest.mark.slow
def test_a_study_name_that_is_not_a_plain_name_is_refused(tmp_path):
    sweep_root = tmp_path / "multirun"
    for name in ("../../escaped", "x" * 300, "a/b"):
        proc = run_cli(
            "-m", *SMALL, f"hydra.sweeper.study_name={name}",
            f"hydra.sweep.dir={sweep_root}/" + "${hydra.sweeper.study_name}",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("error: hydra.sweeper.study_name=") and "plain name" in line
    assert not sweep_root.exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "optuna.db").exists()  # refused before any study
    # The name a sweep's best model is registered under goes into models:/ URIs: the same rule.
    proc = run_cli("-m", *SMALL, "hydra.sweeper.register_model=a/b",
                   f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == (
        "error: hydra.sweeper.register_model=a/b: must be a plain name (letters, digits, '.', "
        "'_', '-'; at most 128 characters), e.g. hydra.sweeper.register_model=lenet-best\n"
    )
    assert not (tmp_path / "optuna.db").exists()


def test_a_fused_group_size_below_one_is_refused_before_anything_runs(tmp_path):
    for size in (-1, 0):
        proc = run_cli(
            "-m", *SMALL, "hydra/launcher=fused", f"hydra.launcher.max_group={size}",
            f"hydra.sweep.dir={tmp_path}/multirun",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (
            f"error: hydra.launcher.max_group={size}: must be null or an integer >= 1"
        )
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_enqueued_trials_that_fill_the_budget_run(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = run_cli(
        "-m", *TINY, "hydra.sweeper.n_trials=2",
        "hydra.sweeper.enqueue=[{lr: 0.5, epochs: 1}, {lr: 0.6, epochs: 1}]",
        f"hydra.sweep.dir={tmp_path}/multirun", f"hydra.sweeper.storage={storage}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = optuna.load_study(study_name="lenet_sweep", storage=storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [t.params for t in trials] == [{"lr": 0.5, "epochs": 1}, {"lr": 0.6, "epochs": 1}]


def _study_file(path) -> bytes:
    """A study of 300 finished trials in `path`; returns its bytes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="lenet_sweep", storage=f"sqlite:///{path}")
    for i in range(300):
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, distributions={
            "lr": optuna.distributions.FloatDistribution(0.01, 3.0)}, value=i / 300))  # fmt: skip
    return path.read_bytes()


@pytest.mark.slow
def test_a_damaged_optuna_file_is_refused_with_one_line_and_left_as_it_was(tmp_path):
    import random

    good = _study_file(tmp_path / "optuna.db")
    third = len(good) // 3
    noise = random.Random(0).randbytes(third)
    damages = {
        "middle": good[:third] + noise + good[2 * third :],
        "truncated": good[: len(good) // 2],
        "header": noise[:100] + good[100:],
    }
    for damage, data in damages.items():
        (tmp_path / "optuna.db").write_bytes(data)
        proc = run_cli(
            "-m", *TINY, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/multirun",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        )  # fmt: skip
        assert proc.returncode == 2, (damage, proc.stderr[-2000:])
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: Optuna storage {tmp_path}/optuna.db is damaged ("), line
        assert "move it aside" in line
        assert (tmp_path / "optuna.db").read_bytes() == data, damage  # nothing written into it
