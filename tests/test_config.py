"""Bad input, as users type it: one line naming key, value and fix; non-zero exit; nothing left."""

import subprocess
import sys
import time

import pytest

from lenet_sweep import PROJECT_ROOT
from tests.conftest import SMALL, run_cli, runs_of

SINGLE = [
    ("lr=-1", "error: lr=-1: must be a finite number > 0, e.g. lr=0.1"),
    ("lr=0", "error: lr=0: must be a finite number > 0, e.g. lr=0.1"),
    ("lr=abc", "error: lr=abc: must be a finite number > 0, e.g. lr=0.1"),
    ("epochs=0", "error: epochs=0: must be an integer >= 1, e.g. epochs=10"),
    ("epochs=2.5", "error: epochs=2.5: must be an integer >= 1, e.g. epochs=10"),
    ("batch_size=0", "error: batch_size=0: must be an integer from 1 to the training set size"),
    (
        "batch_size=100000000",
        "error: batch_size=100000000: must be an integer from 1 to the training set size, e.g. 256 (2048 here)",
    ),
    (
        "model=nosuch",
        "error: In 'config': Could not find 'model/nosuch'; Available options in 'model': lenet, lenet_relu",
    ),
    (
        "optimizer=nosuch",
        "error: In 'config': Could not find 'optimizer/nosuch'; Available options in 'optimizer': adam, sgd",
    ),
    (
        "data.root=/no/such/dir",
        "error: data.root=/no/such/dir: no such directory; point data.root at a folder with the four idx files",
    ),
    ("device=tpu", "error: device=tpu: unknown device; allowed: auto, cpu, cuda, cuda:N"),
    ("progress=maybe", "error: progress=maybe: must be true or false"),
    ("precision=fp16", "error: precision=fp16: must be fp32 or bf16"),
    ("seed=x", "error: seed=x: must be an integer, e.g. seed=0"),
    (
        "data.train_size=0",
        "error: data.train_size=0: must be null or an integer from 1 to the split's size",
    ),
    (
        "no_such_key=1",
        "error: no_such_key=1: no such key in the config; to add a new key, give +no_such_key=1",
    ),
    # a typo gets the knob it was meant for, not Hydra's advice to add the typo as a new key
    ("lrr=0.1", "error: lrr=0.1: no such key in the config; did you mean lr?"),
    (
        "data.trainsize=5",
        "error: data.trainsize=5: no such key in the config; did you mean data.train_size?",
    ),
    (
        "mlflow.experiment=a/b;rm -rf x",
        "error: cannot read the override 'mlflow.experiment=a/b;rm -rf x': in Hydra's grammar ; "
        """and spaces end a value; quote it, e.g. 'key="a/b;c"'""",
    ),
]


def _one_line_error(proc) -> str:
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "mlflow.store.db.utils" not in line
    ]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(("override", "message"), SINGLE)
def test_bad_input_is_one_line_and_leaves_no_run(
    override, message, mlflow_uri, experiment, tmp_path
):
    proc = run_cli(
        *SMALL,
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={experiment}",
        f"hydra.run.dir={tmp_path}",
        override,
    )
    assert proc.returncode == 2
    assert _one_line_error(proc).startswith(message)
    _, runs = runs_of(mlflow_uri, experiment)
    assert runs == []


def test_cuda_without_gpu(mlflow_uri, experiment, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli(
        *SMALL, "device=cuda", f"mlflow.tracking_uri={mlflow_uri}", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 2
    assert (
        _one_line_error(proc)
        == "error: device=cuda: no CUDA GPU is visible here; use device=cpu or auto"
    )


def test_full_error_shows_the_traceback(tmp_path):
    proc = run_cli(*SMALL, "lr=-1", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "lr=-1: must be" in proc.stderr


def test_unreachable_tracking_uri_fails_fast_and_masks_password(tmp_path):
    started = time.time()
    proc = run_cli(
        *SMALL,
        f"hydra.run.dir={tmp_path}",
        env={"MLFLOW_TRACKING_URI": "http://alice:hunter2@127.0.0.1:9"},
    )
    assert proc.returncode == 5  # an outage: the same command runs once the server is up
    line = _one_line_error(proc)
    assert line.startswith("error: MLflow tracking URI http://alice:***@127.0.0.1:9 is unreachable")
    assert "hunter2" not in proc.stderr + proc.stdout
    assert "training on" not in proc.stdout  # failed before training
    assert time.time() - started < 60


def _sweep_args(tmp_path, mlflow_uri, experiment, *extra):
    return [
        "-m",
        *SMALL,
        f"hydra.sweep.dir={tmp_path / 'm'}",
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={experiment}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'o.db'}",
        *extra,
    ]


def test_empty_search_interval(tmp_path, mlflow_uri, experiment):
    proc = run_cli(*_sweep_args(tmp_path, mlflow_uri, experiment, "lr=interval(3.0, 0.01)"))
    assert proc.returncode == 2
    assert _one_line_error(proc) == "error: lr=interval(3.0, 0.01): empty interval; give low < high"
    assert not (tmp_path / "o.db").exists()  # no study created


def test_unreachable_optuna_storage_masks_password(tmp_path, mlflow_uri, experiment):
    url = "postgresql://bob:sekret@127.0.0.1:9/optuna"
    proc = run_cli(*_sweep_args(tmp_path, mlflow_uri, experiment, f"hydra.sweeper.storage={url}"))
    assert proc.returncode == 5  # an outage: the same command runs once the database is up
    line = _one_line_error(proc)
    assert line.startswith(
        "error: Optuna storage postgresql://bob:***@127.0.0.1:9/optuna is not reachable"
    )
    assert "sekret" not in proc.stderr + proc.stdout
    _, runs = runs_of(mlflow_uri, experiment)
    assert runs == []  # no parent run for a sweep that never started


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.sweeper.n_trials=0", "error: hydra.sweeper.n_trials=0: must be an integer >= 1"),
        (
            "hydra.sweeper.n_trials=abc",
            "error: hydra.sweeper.n_trials=abc: must be an integer >= 1",
        ),
        (
            "hydra.sweeper.max_failure_rate=2",
            "error: hydra.sweeper.max_failure_rate=2: must be a number in [0, 1]",
        ),
        (
            "hydra.sweeper.direction=up",
            "error: hydra.sweeper.direction=up: must be maximize, minimize or a list of them",
        ),
        ("hydra.sweeper.nope=1", "error: hydra.sweeper.nope=1: no such key in the config"),
        (
            "hydra.sweeper.n_trails=5",
            "error: hydra.sweeper.n_trails=5: no such key in the config; did you mean "
            "hydra.sweeper.n_trials?",
        ),
        (
            "hydra.sweeper.direction=[maximize,minimize] hydra/sweeper/pruner=median",
            "error: hydra.sweeper.pruner: Optuna cannot prune a study with several objectives; use hydra/sweeper/pruner=none or one direction",
        ),
        (
            "hydra.sweeper.direction=[maximize,minimize,maximize]",
            "error: hydra.sweeper.objectives=['val_acc', 'train_time_s']: name one metric per direction (3), e.g. [val_acc, train_time_s]",
        ),
    ],
)
def test_bad_sweeper_setting(override, message, tmp_path, mlflow_uri, experiment):
    proc = run_cli(*_sweep_args(tmp_path, mlflow_uri, experiment, *override.split()))
    assert proc.returncode == 2
    assert _one_line_error(proc).startswith(message)
    assert not (tmp_path / "o.db").exists()  # no study created


def test_mask_url():
    from lenet_sweep.errors import mask_url

    assert mask_url("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert (
        mask_url("text postgresql+psycopg://u:p@h/db more")
        == "text postgresql+psycopg://u:***@h/db more"
    )
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert mask_url("http://host:5000") == "http://host:5000"


# The launcher plugin hidden as if it were not installed, then the app's own command line.
WITHOUT_PLUGIN = """
import sys
sys.modules[sys.argv[1]] = None
sys.argv = ["lenet_sweep", "-m", sys.argv[2], "hydra.sweeper.n_trials=1"]
from lenet_sweep.cli import cli
cli()
"""


@pytest.mark.parametrize(
    "plugin, launcher, package, extra",
    [
        ("hydra_submitit_launcher", "submitit_local", "hydra-submitit-launcher", "slurm"),
        ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher", "slurm"),
        ("hydra_ray_launcher", "ray_cluster", "hydra-ray-launcher", "ray"),
    ],
)
def test_a_launcher_whose_plugin_is_missing_names_the_extra(plugin, launcher, package, extra):
    module, choice = f"hydra_plugins.{plugin}", f"hydra/launcher={launcher}"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PLUGIN, module, choice],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: {choice} needs {package}, which is not installed: pip install "
        f"'lenet_sweep[{extra}]' (in a checkout: pip install -e '.[{extra}]')\n"
    )


def test_cause_chains_that_loop_back_are_walked_once():
    # An error re-raised "from" itself: every walker of its causes ends (the CLI once hung here).
    from lenet_sweep.config import RunConfig, knob_error, knobs
    from lenet_sweep.db_files import store_file
    from lenet_sweep.errors import Outage, causes, outage

    down = Outage("the store is away")
    down.__cause__ = down
    inner = ConnectionError("refused")
    loop = RuntimeError("wrapped")
    loop.__cause__, inner.__context__ = inner, loop
    assert list(causes(down)) == [down] and list(causes(loop)) == [loop, inner]
    assert outage(down) is down and outage(loop).exit_code == 5
    assert knob_error(loop, knobs(RunConfig)) is None
    assert store_file(loop, "sqlite:////tmp/m.db", "sqlite:////tmp/o.db") is None
