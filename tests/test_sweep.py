"""Sweeps as users run them (`python -m lenet_sweep -m`), read back from Optuna and MLflow."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lenet_sweep.tracking import backend as tracking_backend
from tests.conftest import PRUNED_AND_COMPLETE, model_of, run_together


def best_child_inputs(sweep, by_number, best):
    """The dataset inputs of the best trial's run."""
    run = tracking_backend.client(sweep.mlflow_uri).get_run(by_number[best.number].info.run_id)
    return run.inputs.dataset_inputs


def _assert_one_line_per_trial(out: str, trials) -> None:
    """A sweep's log: each trial's start (number and params) and end once, the UI link once, no
    internal override, no third-party INFO line; every line in one timed format."""
    lines = out.splitlines()
    for t in trials:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in t.params.items())  # fmt: skip
        assert sum(ln.endswith(f"] trial {t.number} started: {params}") for ln in lines) == 1
        assert sum(f"] trial {t.number} done: " in ln for ln in lines) == 1
    assert out.count("mlflow ui ") == 1 and out.count("workflowType=machine_learning") == 1
    for internal in ("trial.parent_run_id", "env_set", "LENET_SWEEP", "Launching", "[I ", "INFO"):
        assert internal not in out
    assert all(re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] ", ln) for ln in lines), out


def test_sweep_records_study_parent_and_children(sweep):
    args = ["hydra.sweeper.n_trials=3", "lr=tag(log, interval(0.05, 2.0))", "epochs=range(1, 3)"]
    proc = sweep.run(*args, "hydra.sweeper.register_model=lenet-best")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(0.01 <= t.params["lr"] <= 2.0 and t.params["epochs"] in (1, 2) for t in trials)
    parents, children = sweep.runs()
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert (
        parent.data.params["study_name"] == "s"
        and "FloatDistribution" in parent.data.params["search_space"]
    )
    best = max(trials, key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.lr"] == str(best.params["lr"])
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for trial in trials:
        child = by_number[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name.startswith(f"t{trial.number:03d} lr=")
        assert child.data.metrics["val_acc"] == pytest.approx(trial.value)  # tuned on val
        assert "test_acc" in child.data.metrics and "val_loss" in child.data.metrics
        assert child.data.params["epochs"] == str(trial.params["epochs"])
        assert child.info.status == "FINISHED"
    results = yaml.safe_load((sweep.dir / "optimization_results.yaml").read_text())
    assert (
        results["best_value"] == pytest.approx(best.value) and results["best_params"] == best.params
    )
    assert f"best trial {best.number}" in proc.stderr + proc.stdout
    _assert_one_line_per_trial(proc.stdout, trials)
    assert re.search(
        r"trial \d done: val_acc=\S+, [\d,]+ examples/sec; best so far: trial ", proc.stdout
    )
    # The validation images: a twelfth of the 2048 used (170), held out, a third dataset input.
    inputs = {i.tags[0].value: i.dataset for i in best_child_inputs(sweep, by_number, best)}
    assert sorted(inputs) == ["evaluation", "training", "validation"]
    assert inputs["validation"].name == "fashion_mnist validation (170)"
    assert inputs["training"].name == "fashion_mnist training (2048)"
    assert "warning" not in proc.stderr.lower()  # val_acc is not a test metric
    # the parent names the best run's model
    best_child = by_number[best.number]
    assert parent.data.tags["best_run_id"] == best_child.info.run_id
    assert parent.data.tags["best_model_uri"] == f"runs:/{best_child.info.run_id}/model"
    model, files = model_of(tracking_backend.client(sweep.mlflow_uri), best_child)
    assert files == ["MLmodel", "conda.yaml", "data", "python_env.yaml", "requirements.txt"]
    assert parent.data.tags["best_model_id"] == model.model_id
    assert sorted(p.name for p in sweep.dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    # n_trials is the total: the same command again runs nothing more.
    again = sweep.run(*args, "hydra.sweeper.register_model=lenet-best")
    assert again.returncode == 0 and len(sweep.trials()) == 3 and len(sweep.runs()[1]) == 3
    # The best model registered once (opt-in), as a version of the name given.
    [version] = tracking_backend.client(sweep.mlflow_uri).search_model_versions(
        "name = 'lenet-best'"
    )
    assert (version.run_id, version.source) == (best_child.info.run_id, f"models:/{model.model_id}")
    assert sweep.runs()[0][0].data.tags["registered_model"] == "lenet-best/1"


def test_the_answer_is_the_best_refit_over_fresh_seeds_once(sweep):
    """After the study, its best trial trained again on all the training images with fresh
    seeds, tested: mean ± std in the closing lines, the results file and the parent run; a
    child run told apart; a rerun of the finished study gives the answer without training."""
    args = ["hydra.sweeper.n_trials=3", "lr=interval(0.3, 1.0)", "hydra.sweeper.refit_seeds=2"]
    proc = sweep.run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = max(sweep.trials(), key=lambda t: t.value)
    [refit] = sweep.refits()
    [parent], children = sweep.runs()
    assert len(children) == 3 and refit.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert refit.info.run_name.startswith(f"refit t{best.number:03d} lr=")
    params = refit.data.params
    assert (params["seeds"], params["seed"], params["lr"]) == ("2", "1042", str(best.params["lr"]))
    inputs = {i.tags[0].value for i in refit.inputs.dataset_inputs}
    assert inputs == {"training", "evaluation"}  # nothing held out
    seeds = [refit.data.metrics[f"seed_{s}.test_acc"] for s in (1042, 1043)]
    mean, std = statistics.fmean(seeds), statistics.pstdev(seeds)
    assert parent.data.metrics["refit_test_acc"] == pytest.approx(mean)
    assert parent.data.metrics["refit_test_acc_std"] == pytest.approx(std)
    answer = yaml.safe_load((sweep.dir / "optimization_results.yaml").read_text())["refit"]
    assert answer["trial"] == best.number and answer["seeds"] == 2
    assert answer["test_acc"] == pytest.approx(mean) and answer["wall_s"] > 0
    assert re.search(rf"answer: lr=\S+: test_acc {mean:.4f} ± {std:.4f} over 2 seeds", proc.stdout)
    assert (sweep.dir / "refit" / ".hydra").is_dir()
    again = sweep.run(*args)
    assert again.returncode == 0 and len(sweep.refits()) == 1
    assert "answer (kept from the study's refit)" in again.stdout


@pytest.mark.slow
def test_multi_objective_sweep_records_the_pareto_front(sweep):
    proc = sweep.run(
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=[maximize,minimize]",
        "lr=tag(log, interval(0.05, 2.0))",
        "epochs=range(1, 3)",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    _, children = sweep.runs()
    for trial in trials:  # the values are the child run's val_acc and train_time_s
        [child] = [r for r in children if r.data.tags["optuna.trial_number"] == str(trial.number)]
        assert trial.values == pytest.approx(
            [child.data.metrics["val_acc"], child.data.metrics["train_time_s"]]
        )
    results = yaml.safe_load((sweep.dir / "optimization_results.yaml").read_text())
    assert results["objectives"] == {"val_acc": "maximize", "train_time_s": "minimize"}
    study = optuna.load_study(study_name=sweep.study_name, storage=sweep.storage)
    front = sorted(t.number for t in study.best_trials)
    assert sorted(s["number"] for s in results["solutions"]) == front
    parents, _ = sweep.runs()
    assert parents[0].data.tags["pareto_trials"] == ",".join(map(str, front))
    plots = tracking_backend.client(sweep.mlflow_uri).list_artifacts(
        parents[0].info.run_id, "plots"
    )
    assert "plots/pareto_front.png" in {a.path for a in plots}


@pytest.mark.slow
def test_enqueued_parameters_run_first_and_once(sweep):
    warm = "hydra.sweeper.enqueue=[{lr: 0.9, epochs: 2}]"
    space = ["lr=tag(log, interval(0.01, 3.0))", "epochs=range(1, 4)"]
    assert sweep.run("hydra.sweeper.n_trials=2", warm, *space).returncode == 0
    assert sweep.trials()[0].params == {"lr": 0.9, "epochs": 2}  # the seed's lr, first
    assert sweep.run("hydra.sweeper.n_trials=3", warm, *space).returncode == 0  # resumed
    trials = sweep.trials()
    assert len(trials) == 3 and trials[2].params != {"lr": 0.9, "epochs": 2}  # not again


@pytest.mark.slow
def test_kill_9_mid_sweep_then_rerun_finishes_the_total(sweep):
    args = sweep.args("hydra.sweeper.n_trials=4", "epochs=6", "lr=interval(0.1, 1.0)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lenet_sweep", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Trial 1 has finished an epoch: kill it mid-trial.
    sweep.wait_for(lambda trials: any(t.number == 1 and t.intermediate_values for t in trials))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [t.state for t in sweep.trials()][:2] == [TrialState.COMPLETE, TrialState.RUNNING]

    rerun = sweep.run("hydra.sweeper.n_trials=4", "epochs=6", "lr=interval(0.1, 1.0)")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = sweep.trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # numbers continue, no duplicates
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4
    assert trials[1].state == TrialState.FAIL  # the killed one, failed before new ones started
    reason = trials[1].user_attrs["fail_reason"]
    assert reason.startswith(f"worker died: pid {proc.pid} on ") and trials[1].user_attrs["rerun"]
    parents, children = sweep.runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    statuses = {int(r.data.tags["optuna.trial_number"]): r.info.status for r in children}
    assert statuses == {0: "FINISHED", 1: "KILLED", 2: "FINISHED", 3: "FINISHED", 4: "FINISHED"}
    killed = next(r for r in children if r.info.status == "KILLED")
    assert killed.data.tags["error"] == reason
    assert sorted(p.name for p in sweep.dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4"]


def test_pruned_trial_stops_early_and_is_marked(sweep):
    proc = sweep.run(
        *PRUNED_AND_COMPLETE,
        "epochs=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = {t.params["lr"]: t.state for t in sweep.trials()}
    assert states == {0.003: TrialState.COMPLETE, 1e-07: TrialState.PRUNED}
    _, children = sweep.runs()
    pruned = [r for r in children if r.data.tags.get("optuna.trial_state") == "PRUNED"]
    assert len(pruned) == 1 and pruned[0].data.tags["pruned_at_epoch"] == "1"
    assert pruned[0].data.metrics["epochs_run"] == 1 and pruned[0].info.status == "FINISHED"
    client = tracking_backend.client(sweep.mlflow_uri)
    assert [m.step for m in client.get_metric_history(pruned[0].info.run_id, "test_acc")] == [1]
    # Pruning read the objective, val_acc: the trial's reports are the run's val_acc curve.
    [trial] = [t for t in sweep.trials() if t.params["lr"] == 1e-07]
    val = client.get_metric_history(pruned[0].info.run_id, "val_acc")
    assert trial.intermediate_values == {m.step: pytest.approx(m.value) for m in val}
    assert [t.state for t in sweep.trials() if t.params["lr"] == 1e-07][0] == TrialState.PRUNED


def test_all_failing_sweep_exits_nonzero_with_one_line(sweep):
    proc = sweep.run(
        "hydra.sweeper.n_trials=2",
        "lr=interval(0.1, 1.0)",
        "data.root=/no/such/dir",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    assert proc.returncode == 4  # the sweep ran, its trials failed
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep s: no trial completed (2 fail;"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert "no such directory" in trials[0].user_attrs["fail_reason"]
    parents, children = sweep.runs()
    assert [p.info.status for p in parents] == ["FAILED"] and children == []


def test_max_failure_rate_stops_the_sweep(sweep):
    proc = sweep.run("hydra.sweeper.n_trials=5", "lr=interval(0.1, 1.0)", "data.root=/no/such/dir")
    assert proc.returncode == 4
    assert len(sweep.trials()) == 3  # 3 of n_trials=5 failed > 0.5: stopped there
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: sweep s: no trial completed (3 fail;")
    )


@pytest.mark.slow
def test_joblib_launcher_runs_batches_in_processes(sweep):
    proc = sweep.run(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "lr=interval(0.1, 1.0)",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert len(pids) == 1  # asked by the one sweep process; trained in joblib's workers
    _, children = sweep.runs()
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(sweep, postgres_url):
    args = sweep.args(
        "hydra.sweeper.n_trials=8",
        "lr=interval(0.1, 1.0)",
        "data.train_size=4096",
        f"hydra.sweeper.storage={postgres_url}",
    )
    results = run_together(*[[*args, f"hydra.sweep.dir={sweep.dir}-{i}"] for i in range(2)])
    assert [code for code, _ in results] == [0, 0], "".join(o[-2000:] for _, o in results)
    outputs = [out for _, out in results]
    study = optuna.load_study(study_name=sweep.study_name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # both workers did trials
    parents, children = sweep.runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(8))
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    # the password reaches neither the logs nor MLflow
    assert all("s3cret-pw" not in out for out in outputs)
    assert "lenet:***@127.0.0.1" in parents[0].data.params["storage"]
    for run in [*parents, *children]:
        assert not any(
            "s3cret-pw" in str(v) for v in [*run.data.params.values(), *run.data.tags.values()]
        )


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "qmc", "nsgaii", "grid"])
def test_every_sampler_config_builds_and_samples(name):
    from hydra.utils import instantiate

    from lenet_sweep.config.plugins import SAMPLERS
    from lenet_sweep.sweep.search_space import grid_choices, parse, suggest

    sampler = instantiate(SAMPLERS[name])
    space, _ = parse(["lr=choice(0.1, 0.3)", "epochs=range(1, 4)"])
    if name == "grid":
        sampler = sampler(grid_choices(space))
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for _ in range(3):
        trial = study.ask()
        params = {k: suggest(trial, k, d) for k, d in space.items()}
        assert params["lr"] in (0.1, 0.3) and params["epochs"] in (1, 2, 3)
        study.tell(trial, params["lr"] * params["epochs"])


def test_tab_completion_lists_group_options():
    # Hydra completes an installed command (`python -m` lines it cannot parse): lenet-sweep
    import shutil

    exe = shutil.which("lenet-sweep") or str(Path(sys.executable).parent / "lenet-sweep")
    proc = subprocess.run(
        [exe, "-sc", "query=bash"],
        capture_output=True,
        text=True,
        env={**os.environ, "COMP_LINE": "lenet-sweep model="},
    )
    assert proc.returncode == 0
    assert set(proc.stdout.split()) >= {"model=lenet", "model=lenet_relu"}
