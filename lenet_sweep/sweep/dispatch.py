"""How a sweep hands its trials to the launcher: one loop shape (`run(feed)`) over three
dispatchers, chosen by the launcher's name from one table (config.plugins.DISPATCH).

- Batches: Hydra's protocol, n_jobs trials to `launch`, all told once all have ended.
- InFlight: n_jobs trials in flight on a process launcher; the moment one ends its result is told
  and the study's next trial launched (lenet_sweep.sweep.in_flight: each plugin's adapter).
- Streamed: a launcher with `stream(feed, slots, refill)` asks the feed for each trial as a slot
  frees and hands each result back as it comes (the fused one).

A launcher the table does not name gets Hydra's batches, and the sweep says so in one line;
`hydra.sweeper.batches=true` asks for batches from any launcher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

from lenet_sweep import signals
from lenet_sweep.config.plugins import DISPATCH
from lenet_sweep.errors import first_line, mask_url, outage
from lenet_sweep.sweep import in_flight, study_db
from lenet_sweep.sweep.protocol import TrialResult
from lenet_sweep.sweep.report import SweepFailed

log = logging.getLogger("lenet_sweep.sweep")


class Dispatcher:
    """Hands trials from a StudyFeed to a launcher. `trials_lost(trials)` ends the records of
    trials whose job process died (the app's: their MLflow runs)."""

    def __init__(self, launcher, settings, sweep_dir, trials_lost: Callable) -> None:
        self.launcher, self.settings, self.sweep_dir = launcher, settings, sweep_dir
        self.trials_lost, self.lost = trials_lost, 0

    def run(self, feed) -> None:
        raise NotImplementedError

    def job_died(self, feed, numbers: list[int], error: Exception) -> None:
        """Jobs whose process died (submitit and Ray raise for a whole batch): their trials are
        failed for a rerun, so that new trials take their place; past max_failure_rate the
        sweep stops."""
        if down := outage(error, self.sweep_dir):  # e.g. Hydra writing a job dir
            raise down from error
        why = f"job process died: {type(error).__name__}: {first_line(error, 300)}"
        log.warning("trials %s: %s; their trials run again", sorted(numbers), why)
        for number in numbers:
            study_db.fail_for_rerun(feed.study, feed.storage, number, why)
            feed.heartbeat.drop(number)
            feed.in_flight.pop(number, None)
        self.trials_lost([t for t in feed.study.get_trials(deepcopy=False) if t.number in numbers])
        self.lost += len(numbers)
        if self.lost / self.settings.n_trials > self.settings.max_failure_rate:
            raise SweepFailed(
                f"{self.lost} trials lost with their job processes, "
                f"last: {type(error).__name__}: {mask_url(str(error))[:300]}; "
                "see the launcher's job logs"
            ) from error


class Batches(Dispatcher):
    def run(self, feed) -> None:
        while not signals.check() and not feed.stopped and (asked := feed.ask(self.n_jobs)):
            numbers = [number for number, _ in asked]
            try:
                returns = self.launcher.launch(
                    [overrides for _, overrides in asked], initial_job_idx=numbers[0]
                )
            except Exception as e:  # noqa: BLE001 - a launcher reports a dead job so
                self.job_died(feed, numbers, e)
                continue
            feed.tell([TrialResult(n, r) for n, r in zip(numbers, returns, strict=True)])

    @property
    def n_jobs(self) -> int:
        return self.settings.n_jobs


class InFlight(Dispatcher):
    def __init__(self, launcher, settings, sweep_dir, trials_lost, adapter: str) -> None:
        super().__init__(launcher, settings, sweep_dir, trials_lost)
        self.submit = in_flight.ADAPTERS[adapter](launcher)

    def run(self, feed) -> None:
        running: dict[futures.Future, int] = {}
        try:
            while True:
                while len(running) < self.settings.n_jobs and (asked := feed.next_job()):
                    running[self.submit(*asked)] = asked[0]
                if not running:
                    return
                done, _ = futures.wait(running, timeout=1, return_when=futures.FIRST_COMPLETED)
                signals.check()
                for future in done:
                    number = running.pop(future)
                    try:
                        ret = future.result()
                    except Exception as e:  # noqa: BLE001 - a launcher reports a dead job so
                        self.job_died(feed, [number], e)
                        continue
                    feed.finished(TrialResult(number, ret))
        except BaseException:
            self.submit.close()
            raise


class Streamed(Dispatcher):
    def run(self, feed) -> None:
        self.launcher.stream(feed, self.settings.n_jobs, refill=not self.settings.batches)
        signals.check()


def dispatcher_for(launcher, name: str | None, settings, sweep_dir, trials_lost) -> Dispatcher:
    """DISPATCH's dispatcher for hydra/launcher=`name`; Hydra's batches when asked for, or when
    the table does not name the launcher (said in one line)."""
    mode = DISPATCH.get(str(name))
    args = (launcher, settings, sweep_dir, trials_lost)
    if mode == "streamed":  # its own batches too, so that its groups are reported
        return Streamed(*args)
    if mode is None:
        shown = f"hydra/launcher={name}: trials go in Hydra's batches of n_jobs"
        log.info("%s (%d)", shown, settings.n_jobs)
    if mode is None or settings.batches or mode == "batches":
        return Batches(*args)
    return InFlight(*args, adapter=mode.partition(":")[2])
