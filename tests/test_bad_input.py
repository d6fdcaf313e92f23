"""Faults as users meet them: parallel first starts, unwritable or broken stores, a deleted
experiment, search spaces that cannot work, resumes. Each read back from the stores and the disk.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL, run_cli, run_together, runs_of

TINY = [*SMALL, "data.train_size=256", "data.test_size=256"]


def _one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "mlflow.store.db" not in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@contextlib.contextmanager
def immutable(path: Path):
    """chattr +i: root bypasses file modes, not the immutable flag."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _store_is_healthy(db: Path) -> None:
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert "runs" in names and not any(n.startswith("_alembic_tmp") for n in names), names


@pytest.mark.slow
def test_runs_started_together_on_a_new_store_are_all_recorded(tmp_path):
    for round_ in range(5):
        db = tmp_path / f"round{round_}" / "mlflow.db"
        db.parent.mkdir()
        uri = f"sqlite:///{db}"
        results = run_together(
            *[
                [
                    *TINY,
                    f"mlflow.tracking_uri={uri}",
                    "mlflow.experiment=e",
                    f"hydra.run.dir={db.parent / str(i)}",
                ]
                for i in range(4)
            ]
        )
        assert [code for code, _ in results] == [0] * 4, "\n".join(o[-1500:] for _, o in results)
        _, runs = runs_of(uri, "e")
        assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
        assert all(r.data.metrics["test_acc"] > 0 for r in runs)
        _store_is_healthy(db)


@pytest.mark.slow
def test_sweeps_started_together_on_new_stores_share_the_study(tmp_path):
    args = [
        "-m",
        *TINY,
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=e",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "hydra.sweeper.study_name=s",
        "hydra.sweeper.n_trials=4",
        "lr=interval(0.1, 1.0)",
    ]
    results = run_together(*[[*args, f"hydra.sweep.dir={tmp_path / str(i)}"] for i in range(2)])
    assert [code for code, _ in results] == [0, 0], "".join(o[-2000:] for _, o in results)
    import optuna

    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    _, runs = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "e")
    assert len(runs) == 5  # one parent, four children
    _store_is_healthy(tmp_path / "mlflow.db")


def test_a_half_migrated_store_is_named_with_the_repair(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:  # what a migration killed half-way leaves behind
        conn.execute("CREATE TABLE _alembic_tmp_tags (id INTEGER)")
    proc = run_cli(*TINY, f"mlflow.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    line = _one_line(proc)
    assert line.startswith(f"error: the MLflow store sqlite:///{db} is half-migrated (")
    assert "drop its _alembic_tmp_* tables and run `mlflow db upgrade" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("folder", ["/proc/nope", "MISSING"])
def test_sqlite_store_in_a_missing_folder_is_refused(folder, tmp_path):
    folder = str(tmp_path / "no" / "dir") if folder == "MISSING" else folder
    url = f"sqlite:///{folder}/x.db"
    proc = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'r'}", env={"MLFLOW_TRACKING_URI": url})
    assert proc.returncode == 2
    assert _one_line(proc) == (
        f"error: MLflow store {url}: folder {folder} does not exist; create it or set "
        "MLFLOW_TRACKING_URI / mlflow.tracking_uri to a file in an existing folder"
    )
    assert not Path(folder).exists() and not (tmp_path / "r").exists()

    proc = run_cli(
        "-m",
        *TINY,
        f"hydra.sweeper.storage={url}",
        f"hydra.sweep.dir={tmp_path / 'm'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert proc.returncode == 2
    assert _one_line(proc).startswith(
        f"error: Optuna storage {url}: folder {folder} does not exist"
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_unwritable_mlflow_store_is_refused_before_training(tmp_path):
    db = tmp_path / "mlflow.db"
    assert (
        run_cli(
            *TINY, f"mlflow.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'a'}"
        ).returncode
        == 0
    )
    before = db.read_bytes()
    with immutable(db):
        proc = run_cli(
            *TINY, f"mlflow.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'b'}"
        )
    assert proc.returncode == 2
    assert _one_line(proc).startswith(
        f"error: MLflow store sqlite:///{db}: {db} is not writable (Operation not permitted); "
        "make it writable or set MLFLOW_TRACKING_URI / mlflow.tracking_uri to another file"
    )
    assert "training on" not in proc.stdout and db.read_bytes() == before
    assert not (tmp_path / "b").exists()


def test_unwritable_outputs_are_refused(tmp_path):
    locked = tmp_path / "outputs"
    locked.mkdir()
    with immutable(locked):
        single = run_cli(
            *TINY,
            f"hydra.run.dir={locked / 'run'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        )
        sweep = run_cli(
            "-m",
            *TINY,
            f"hydra.sweep.dir={locked / 'multirun'}",
            "lr=interval(0.1, 1.0)",
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        )
    assert single.returncode == 2
    assert _one_line(single) == (
        f"error: cannot write {locked / 'run'} (Operation not permitted); make it writable or set "
        "hydra.run.dir (hydra.sweep.dir with -m) to a writable folder"
    )
    assert sweep.returncode == 2
    assert _one_line(sweep).startswith(
        f"error: hydra.sweep.dir={locked / 'multirun'}: cannot write in {locked} (Operation not permitted)"
    )
    assert not (tmp_path / "optuna.db").exists()  # no study made for a sweep that cannot run
    _, runs = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "lenet_sweep")
    assert runs == []


def test_unwritable_artifacts_are_refused_before_training(tmp_path):
    db = tmp_path / "mlflow.db"
    artifacts = tmp_path / "mlartifacts"
    artifacts.mkdir()
    with immutable(artifacts):
        proc = run_cli(
            *TINY, f"mlflow.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'r'}"
        )
    assert proc.returncode == 2
    assert _one_line(proc) == (
        f"error: MLflow artifacts go to {artifacts}: cannot write in {artifacts} (Operation not "
        "permitted); make it writable, or set mlflow.tracking_uri to a store in a writable folder"
    )
    assert "training on" not in proc.stdout and not (tmp_path / "r").exists()
    _, runs = runs_of(f"sqlite:///{db}", "lenet_sweep")
    assert runs == []  # no run opened, none left FAILED or RUNNING


def test_a_deleted_experiment_is_named_with_the_fix(tmp_path, mlflow_uri, experiment):
    from lenet_sweep.tracking import backend as tracking_backend

    client = tracking_backend.client(mlflow_uri)
    client.delete_experiment(tracking_backend.prepare_experiment(mlflow_uri, "fresh-" + experiment))
    common = [f"mlflow.tracking_uri={mlflow_uri}", f"mlflow.experiment=fresh-{experiment}"]
    single = run_cli(*TINY, *common, f"hydra.run.dir={tmp_path / 'r'}")
    sweep = run_cli(
        "-m",
        *TINY,
        *common,
        "lr=interval(0.1, 1.0)",
        f"hydra.sweep.dir={tmp_path / 'm'}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
    )
    for proc in (single, sweep):
        assert proc.returncode == 2
        line = _one_line(proc)
        assert line.startswith(
            f"error: mlflow.experiment=fresh-{experiment}: the experiment is deleted in"
        )
        assert "restore it (MLflow UI, or `mlflow experiments restore --experiment-id" in line
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=inf", "error: lr=inf: must be a finite number > 0, e.g. lr=0.1"),
        ("lr=1e400", "error: lr=inf: must be a finite number > 0, e.g. lr=0.1"),
        (
            "data.train_size=100000",
            "error: data.train_size=100000: must be null or an integer from 1 to the split's size (60000 here)",
        ),
        (
            "data.test_size=20000",
            "error: data.test_size=20000: must be null or an integer from 1 to the split's size (10000 here)",
        ),
        (
            "mlflow.experiment=''",
            "error: mlflow.experiment='': must be a name, e.g. mlflow.experiment=lenet_sweep",
        ),
    ],
)
def test_values_that_slipped_through_are_refused(override, message, tmp_path):
    proc = run_cli(
        *SMALL,
        override,
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"hydra.run.dir={tmp_path / 'runs' / 'r'}",
    )
    assert proc.returncode == 2
    assert _one_line(proc) == message
    assert not (tmp_path / "m.db").exists()  # refused before any store was made
    assert not (tmp_path / "runs" / "r").exists()  # and no run dir is left behind


@pytest.mark.slow
def test_a_refused_run_removes_only_what_it_made(tmp_path):
    """A run refused before training in a folder that existed leaves the folder and its files;
    one in new folders removes them all, up to the first that existed."""
    user = tmp_path / "u"
    user.mkdir()
    (user / "important.log").write_text("precious")
    (user / ".hydra").mkdir()  # even a dir another run left: not this process's
    (user / ".hydra" / "config.yaml").write_text("theirs")
    store = f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"
    for run_dir in (user, tmp_path / "new" / "a" / "b"):
        proc = run_cli(*SMALL, store, f"hydra.run.dir={run_dir}", "resume=/nonexistent")
        assert proc.returncode == 2
        assert _one_line(proc).startswith("error: resume=/nonexistent: no checkpoint.pt there")
    assert sorted(p.name for p in user.iterdir()) == [".hydra", "important.log"]
    assert (user / "important.log").read_text() == "precious"
    assert [p.name for p in (user / ".hydra").iterdir()] == ["config.yaml"]  # Hydra's others: gone
    assert not (tmp_path / "new").exists()
    (user / "lenet_sweep.log").unlink(missing_ok=True)  # Hydra's job log, if it wrote one: new
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = run_cli(*SMALL, store, f"hydra.run.dir={fresh}", "resume=/nonexistent")
    assert proc.returncode == 2 and fresh.is_dir() and not list(fresh.iterdir())


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "epochs=interval(1.5, 3.5)",
            "error: epochs: searched over floats in [1.5, 3.5], but epochs must be an integer >= 1, e.g. epochs=10; for integers use int(interval(a, b)) or range(a, b)",
        ),
        (
            "lr=tag(log, interval(0.0, 1.0))",
            "error: lr=tag(log, interval(0.0, 1.0)): log scale needs low > 0",
        ),
        (
            "lr=interval(0.0, 1.0)",
            "error: lr: searched over floats in [0.0, 1.0], but lr must be a finite number > 0, e.g. lr=0.1",
        ),
        (
            "lr=choice(0.1, inf)",
            "error: lr: searched over choice(0.1, inf), but lr must be a finite number > 0, e.g. lr=0.1",
        ),
        (
            "model=choice(lenet, resnet)",
            "error: model: searched over choice(lenet, resnet); resnet is not a model, choose from lenet, lenet_relu",
        ),
        (
            "lr=choice()",
            "error: Error parsing override 'lr=choice()'; ValueError while evaluating 'choice()': empty choice is not legal",
        ),
    ],
)
def test_search_spaces_that_cannot_work_are_refused_before_the_study(space, message, tmp_path):
    proc = run_cli(
        "-m",
        *SMALL,
        space,
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'o.db'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"hydra.sweep.dir={tmp_path / 'x'}",
    )
    assert proc.returncode == 2
    assert _one_line(proc) == message
    assert not (tmp_path / "o.db").exists() and not (tmp_path / "m.db").exists()
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_resume_after_sigint_ends_clean_and_a_longer_resume_is_a_new_run(
    tmp_path, mlflow_uri, experiment
):
    common = [
        *SMALL,
        "epochs=5",
        "data.train_size=8000",
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={experiment}",
    ]
    first = tmp_path / "first"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lenet_sweep", *common, f"hydra.run.dir={first}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while not (first / "checkpoint.pt").exists():  # epoch 1 done: 4 epochs to go
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    client, [killed] = runs_of(mlflow_uri, experiment)
    assert killed.info.status == "KILLED" and killed.data.tags["error"].startswith("Terminated")

    again = run_cli(*common, f"hydra.run.dir={tmp_path / 'second'}", f"resume={first}")
    assert again.returncode == 0, again.stderr[-2000:]
    _, [run] = runs_of(mlflow_uri, experiment)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "error" not in run.data.tags  # the interruption is over
    assert len(client.get_metric_history(run.info.run_id, "examples_per_sec")) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [
        1,
        2,
        3,
        4,
        5,
    ]

    longer = run_cli(
        *common, "epochs=6", f"hydra.run.dir={tmp_path / 'third'}", f"resume={tmp_path / 'second'}"
    )
    assert longer.returncode == 0, longer.stderr[-2000:]
    _, runs = runs_of(mlflow_uri, experiment)
    new = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert new.data.tags["lenet_sweep.resumed_from"] == run.info.run_id
    assert new.data.params["epochs"] == "6" and run.data.params["epochs"] == "5"  # each its own
    steps = [m.step for m in client.get_metric_history(new.info.run_id, "test_acc")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # the history it continues, then its own epoch
    state = torch.load(tmp_path / "third" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 6 and state["mlflow_run_id"] == new.info.run_id


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["-m", "hydra/launcher=fused", "hydra.launcher.devices=[cuda:0]"],
            {},
            "error: hydra.launcher.devices=[cuda:0]: cuda:0 is not a device here (0 CUDA GPU(s) "
            "visible); use cpu or all",
        ),
        (
            ["-m", "hydra/launcher=fused", "hydra.launcher.devices=[tpu]"],
            {},
            "error: hydra.launcher.devices=[tpu]: tpu is not cpu, cuda or cuda:N",
        ),
        (
            ["-m", "hydra/launcher=fused", "hydra.launcher.devices=[]"],
            {},
            "error: hydra.launcher.devices=[]: names no device; give null (this process), all, or a "
            "list",
        ),
        (
            ["-m", "hydra.sweeper.objectives=[nosuch]"],
            {},
            "error: hydra.sweeper.objectives: nosuch is not a metric a run returns; choose from "
            "examples_per_sec, test_acc, test_loss, train_acc, train_loss, train_time_s, val_acc, "
            "val_loss (or one's _std, with seeds > 1)",
        ),
        (
            ["-m", "hydra.sweeper.enqueue=[{lrr: 0.9}]"],
            {},
            "error: hydra.sweeper.enqueue: lrr is not searched (the search space: lr); did "
            "you mean lr?",
        ),
        (
            ["-m", "hydra.sweeper.params={lrr: 'interval(0.1,1.0)'}"],
            {},
            "error: hydra.sweeper.params: lrr is not a key of the config; did you mean lr?",
        ),
        (
            ["-m", "resume=last"],
            {},
            "error: resume=last: a sweep's trials start afresh; a stopped sweep goes on when the same "
            "command runs again (drop resume)",
        ),
        (
            ["-m", "hydra.sweeper.storage=mysql://u:pw@127.0.0.1/db"],
            {},
            "error: Optuna storage mysql://u:***@127.0.0.1/db: its database driver is not installed",
        ),
        (
            ["-m", "seeds=5000"],
            {},
            "error: seeds=5000: 5000 members of batch 256 need about 230.",
        ),
        (
            ["-m", "hydra/launcher=fused", "hydra.sweeper.n_jobs=6000"],
            {},
            "error: hydra.sweeper.n_jobs=6000 with seeds=1: 6000 members of batch 256 need about",
        ),
        (
            ["seeds=5000"],
            {},
            "error: seeds=5000: 5000 members of batch 256 need about 230.",
        ),
        (
            ["+lrr=0.1"],
            {},
            "error: +lrr: no such key in the config, nothing would read it; did you mean lr?",
        ),
        (
            [],
            {"LENET_SWEEP_SPEEDUPS": "bogus"},
            "error: LENET_SWEEP_SPEEDUPS=bogus: not a speed setting; give all, none, or some of "
            "startup_gc,host_memory,fast_exit,channels_last (comma-separated)",
        ),
        (
            ["-m", "hydra.sweeper.study_name=étude_λ"],
            {},
            "error: cannot read the override 'hydra.sweeper.study_name=étude_λ': Hydra's grammar "
            "reads unquoted values in ASCII",
        ),
    ],
)
def test_every_setting_is_checked_before_anything_exists(args, env, message, tmp_path):
    """Refused with one line before a study, a run or a folder exists (issue 35, finding 3)."""
    stores = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    stores += [f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}"]
    if "hydra.sweeper.storage" not in " ".join(args):
        stores.append(f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}")
    proc = run_cli(*args, *SMALL, *stores, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_line(proc).startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no study, store, run or folder


@pytest.mark.parametrize("kind", ["folder", "random bytes"])
def test_a_journal_that_is_a_folder_or_damaged_is_refused_and_left_as_it_was(kind, tmp_path):
    journal = tmp_path / "study.log"
    if kind == "folder":
        journal.mkdir()
        expected = f"error: hydra.sweeper.storage=journal:///{journal}: {journal} is a folder"
    else:
        journal.write_bytes(bytes(range(256)) * 8)
        expected = f"error: Optuna journal {journal} is damaged (UnicodeDecodeError:"
    before = sorted(p.name for p in tmp_path.iterdir())
    stores = [f"hydra.sweeper.storage=journal:///{journal}", f"hydra.sweep.dir={tmp_path / 's'}"]
    proc = run_cli("-m", *SMALL, *stores, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _one_line(proc).startswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock, study or store
    assert kind == "folder" or journal.read_bytes() == bytes(range(256)) * 8
