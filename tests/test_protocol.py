"""The sweeper <-> job protocol: job outcomes, and a trial reached from a job's own config."""

from __future__ import annotations

import os

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from lenet_sweep.sweep import protocol
from lenet_sweep.sweep.feed import record
from lenet_sweep.sweep.trial_link import TrialLink


def _job(status: str, value) -> JobReturn:
    job = JobReturn()
    job.status = JobStatus[status]
    job.return_value = value
    return job


@pytest.mark.parametrize(
    ("status", "value", "state", "reason"),
    [
        ("COMPLETED", 0.8, TrialState.COMPLETE, None),
        ("COMPLETED", {"test_acc": 0.7, "train_acc": 0.9}, TrialState.COMPLETE, None),
        (
            "COMPLETED",
            float("nan"),
            TrialState.FAIL,
            "ValueError: job returned nan for ['test_acc']",
        ),
        (
            "COMPLETED",
            float("inf"),
            TrialState.FAIL,
            "ValueError: job returned inf for ['test_acc']",
        ),
        (
            "COMPLETED",
            {"train_acc": 0.9},
            TrialState.FAIL,
            "ValueError: job returned {'train_acc': 0.9}, not values for ['test_acc']",
        ),
        (
            "COMPLETED",
            "high",
            TrialState.FAIL,
            "ValueError: job returned 'high', not values for ['test_acc']",
        ),
        ("FAILED", RuntimeError("boom"), TrialState.FAIL, "RuntimeError: boom"),
        (
            "FAILED",
            RuntimeError("postgresql://u:pw@h/db down"),
            TrialState.FAIL,
            "RuntimeError: postgresql://u:***@h/db down",
        ),
        ("FAILED", optuna.TrialPruned("p"), TrialState.PRUNED, None),
    ],
)
def test_job_results_map_to_trial_states(status, value, state, reason):
    outcome = protocol.job_outcome(_job(status, value), ["test_acc"])
    expected = value.get("test_acc") if isinstance(value, dict) else value
    assert outcome.state == state
    assert outcome.values == ([expected] if state == TrialState.COMPLETE else None)
    assert outcome.reason == (reason if state == TrialState.FAIL else outcome.reason)

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.report(0.5, 1)
    record(study, trial, outcome)
    frozen = study.trials[0]
    assert frozen.state == state
    assert frozen.user_attrs.get(protocol.FAIL_REASON) == reason
    if state == TrialState.COMPLETE:
        assert frozen.value == expected


def test_several_objectives_are_read_by_name_or_in_order():
    metrics = {"test_acc": 0.8, "train_time_s": 12.0}
    names = ["test_acc", "train_time_s"]
    assert protocol.job_outcome(_job("COMPLETED", metrics), names).values == [0.8, 12.0]
    assert protocol.job_outcome(_job("COMPLETED", [0.8, 12.0]), names).values == [0.8, 12.0]
    wrong = protocol.job_outcome(_job("COMPLETED", 0.8), names)
    assert wrong.state == TrialState.FAIL and "0.8 for ['test_acc', 'train_time_s']" in wrong.reason


def test_storage_env_is_restored(monkeypatch):
    monkeypatch.setenv(protocol.STORAGE_ENV, "sqlite:///before.db")
    with protocol.storage_env("sqlite:///during.db"):
        assert os.environ[protocol.STORAGE_ENV] == "sqlite:///during.db"
    assert os.environ[protocol.STORAGE_ENV] == "sqlite:///before.db"
    monkeypatch.delenv(protocol.STORAGE_ENV)
    with protocol.storage_env("sqlite:///during.db"):
        pass
    assert protocol.STORAGE_ENV not in os.environ


def test_round_trip_from_sweeper_to_job_and_back(tmp_path, make_cfg, monkeypatch):
    """The sweeper's side writes what the job's side reads, and the other way round."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="rt", storage=url, direction="maximize")
    asked = study.ask()
    overrides = protocol.trial_overrides(asked.number, "t000 lr=0.1", "rt", "parent123")
    assert all(protocol.is_trial_override(o) for o in overrides)
    cfg = make_cfg(*overrides)  # the job's config, as Hydra composes it from those overrides
    for override in protocol.job_env(asked.number, "rt"):  # what Hydra's env_set does for the job
        key, value = override.removeprefix("++hydra.job.env_set.").split("=", 1)
        monkeypatch.setenv(key, value.strip("'"))
    pruner = {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5}
    with protocol.storage_env(url):
        link = TrialLink.current({"pruner": pruner})
    assert link.number == asked.number and cfg.trial.name == "t000 lr=0.1"
    assert link.run_tags(cfg.trial.parent_run_id) == {
        protocol.TAG_PARENT_RUN: "parent123",
        protocol.TAG_STUDY_NAME: "rt",
        protocol.TAG_TRIAL_NUMBER: str(asked.number),
    }
    link.started("run-abc")
    assert link.report(0.9, 1) is False  # above the threshold: go on
    assert link.report(0.1, 2) is True  # the job's own pruner (from hydra.sweeper.pruner) says stop
    link.completed(12.5)
    trial = optuna.load_study(study_name="rt", storage=url).trials[0]
    assert trial.intermediate_values == {1: 0.9, 2: 0.1}
    assert trial.user_attrs[protocol.MLFLOW_RUN_ID] == "run-abc"
    assert trial.user_attrs[protocol.TRAIN_TIME_S] == 12.5


def test_a_job_without_the_storage_variable_uses_its_composed_storage(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="remote", storage=url)
    asked = study.ask()
    monkeypatch.setenv(protocol.TRIAL_ENV, str(asked.number))
    monkeypatch.setenv(protocol.STUDY_ENV, "remote")
    monkeypatch.delenv(protocol.STORAGE_ENV, raising=False)  # a Ray cluster's worker
    link = TrialLink.current({"storage": url, "pruner": None})
    assert link.number == asked.number and link.study.study_name == "remote"
    with pytest.raises(RuntimeError, match="LENET_SWEEP_OPTUNA_STORAGE is not"):
        TrialLink.current({"pruner": None})


def test_single_run_has_no_trial_link(monkeypatch):
    monkeypatch.delenv(protocol.TRIAL_ENV, raising=False)
    assert TrialLink.current() is None


def test_a_launcher_the_dispatch_table_does_not_name_gets_batches_said_in_one_line(caplog):
    from types import SimpleNamespace

    from lenet_sweep.sweep.dispatch import Batches, InFlight, Streamed, dispatcher_for

    settings = SimpleNamespace(n_jobs=4, batches=False, n_trials=8, max_failure_rate=0.5)
    with caplog.at_level("INFO", logger="lenet_sweep.sweep"):
        unknown = dispatcher_for(object(), "ray_aws", settings, None, lambda trials: None)
    assert isinstance(unknown, Batches)
    assert caplog.messages == ["hydra/launcher=ray_aws: trials go in Hydra's batches of n_jobs (4)"]
    assert isinstance(dispatcher_for(object(), "fused", settings, None, None), Streamed)
    assert isinstance(dispatcher_for(object(), "basic", settings, None, None), Batches)

    class Joblib:  # what the joblib adapter reads of hydra-joblib-launcher's launcher
        joblib = {"n_jobs": 2}

    assert isinstance(dispatcher_for(Joblib(), "joblib", settings, None, None), InFlight)
    settings.batches = True  # hydra.sweeper.batches=true: batches from any launcher
    assert isinstance(dispatcher_for(Joblib(), "joblib", settings, None, None), Batches)
