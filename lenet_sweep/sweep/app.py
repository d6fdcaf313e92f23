"""The one point where an app adds to the generic sweep: `hydra.sweeper.app`, the dotted path of
a SweepApp subclass. This base adds nothing, so that any Hydra app sweeps with the sweep alone;
lenet_sweep's own (lenet_sweep.job.sweep_app) adds its checks, the MLflow parent run and a
child run per trial. The sweep imports nothing of an app's config or tracking."""

from __future__ import annotations

from hydra.utils import get_class


class NoRecord:
    """The record of a sweep whose app keeps none (the study alone)."""

    run_id = None

    def set_tags(self, tags) -> None:
        pass

    def log_metrics(self, metrics) -> None:
        pass

    def end(self, status: str) -> None:
        pass


class SweepApp:
    """What an app adds to a sweep, at each of its steps; each does nothing here."""

    tracking_uri: str | None = None  # a store the app writes (its sqlite file named on a fault)

    def __init__(self, config, settings) -> None:
        self.config, self.settings = config, settings

    def check(self, space: dict, group_options) -> None:
        """The app's own checks of the sweep (its knobs' types and ranges, say), before any
        study, run or folder exists."""

    def prepare(self) -> None:
        """The app's stores, once every check has passed and before the study is opened."""

    def open_record(self, study, params: dict):
        """The sweep's record beside its study (called under the ask lock): NoRecord here."""
        return NoRecord()

    def trial_overrides(self, trial, record) -> list[str]:
        """Overrides the app's job takes besides the trial's params (its bookkeeping)."""
        return []

    def trials_lost(self, trials) -> None:
        """Trials failed because their worker or job process died: end their records."""

    def finish(self, record, study, best: list, results: dict, objectives: list[str]) -> None:
        """The study's best trial (the Pareto front: several) and the results, into the record."""

    refit_metric = "value"  # what the refit's job returns, its mean (and `<metric>_std`)

    def refit_overrides(self, best, seeds: int, record) -> list[str] | None:
        """What the best trial's params and fixed values take besides, to be trained again with
        `seeds` fresh seeds and tested (lenet_sweep.sweep.refit); None: no refit."""
        return None

    def failure(self, error: Exception):
        """The app's one-line error (a UserError) for an error of its stores, or None."""
        return None


def load(path: str | None, config, settings) -> SweepApp:
    """hydra.sweeper.app's class, built; the base SweepApp for none."""
    return (get_class(path) if path else SweepApp)(config, settings)
