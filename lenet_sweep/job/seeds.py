"""A run's seeds (`seeds: R`): its config trained with R seeds side by side, as one run (or trial).

The seeds are the run's `seed`, seed+1, ..., seed+R-1, each a member of a fused group: the job's
own group on any device and launcher, or R of the fused launcher's slots. Each seed's own hooks
(divergence) run on its own epochs; once every seed has ended epoch e, the run's hooks (its MLflow metrics, pruning) see the mean over the seeds, each metric with its
standard deviation beside it (`test_acc_std`). A seed that fails, diverges or is pruned stops
its siblings with it: the trial has one outcome. The trial's model and curves are its first
seed's; each seed's final metrics are logged as `seed_<seed>.<metric>`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from lenet_sweep.core.hooks import Diverged
from lenet_sweep.core.state import EpochHook, TrainResult, TrainState
from lenet_sweep.fused.trainer import Member


class Seeds:
    """The members of one trial's R seeds, and the trial's mean over them."""

    def __init__(self, nets, seeds: Sequence[int], epochs: int, own_hooks, trial_hooks, name):
        """`nets`: (net, optimizer) per seed; `own_hooks(r)`: seed r's hooks; `trial_hooks`:
        the trial's, on the mean."""
        self.seeds, self.trial_hooks = list(seeds), trial_hooks
        self.members = [
            Member(
                net,
                opt,
                epochs,
                seed,
                [self._hook(r, own_hooks(r))],
                name=f"{name} seed {seed}".strip(),
            )
            for r, ((net, opt), seed) in enumerate(zip(nets, seeds, strict=True))
        ]
        self.result = TrainResult()  # the mean's history; totals at the end
        self.error: BaseException | None = None
        self._ended: dict[int, dict[int, TrainState]] = {}  # epoch -> seed index -> its state

    def _hook(self, r: int, own: list[EpochHook]) -> EpochHook:
        def hook(state: TrainState) -> None:
            if self.error is not None:
                raise self.error
            try:
                for own_hook in own:
                    own_hook(state)
                ended = self._ended.setdefault(state.epoch, {})
                ended[r] = state
                if len(ended) == len(self.seeds):
                    mean = self._mean(self._ended.pop(state.epoch))
                    for trial_hook in self.trial_hooks:
                        trial_hook(mean)
            except Diverged as e:  # the trial's reason says which seed
                self.stop(e.of_seed(self.seeds[r]))
                raise self.error from e
            except Exception as e:
                self.stop(e)
                raise

        return hook

    def stop(self, error: BaseException) -> None:
        """The trial's end: every seed stops with it (at its next epoch boundary at the latest)."""
        self.error = self.error or error
        for m in self.members:
            m.error = m.error or self.error

    def _mean(self, states: dict[int, TrainState]) -> TrainState:
        stats = [states[r].stats for r in sorted(states)]
        mean = {"epoch": stats[0]["epoch"]}
        for key in (k for k in stats[0] if k != "epoch"):
            values = [s[key] for s in stats]
            mean[key] = statistics.fmean(values)
            mean[f"{key}_std"] = statistics.pstdev(values)
        self.result.history.append(mean)
        first = states[0]
        return TrainState(first.net, first.optimizer, first.shuffle, self.result)

    def finished(self) -> TrainResult:
        """The trial's result once all its seeds have left: the mean's history, the seeds'
        examples, the longest seed's time (they train side by side); raises the trial's error."""
        if self.error is not None:
            raise self.error
        results = [m.result for m in self.members]
        self.result.examples_seen = sum(r.examples_seen for r in results)
        self.result.train_time_s = max(r.train_time_s for r in results)
        self.result.eval_time_s = max(r.eval_time_s for r in results)
        return self.result

    def results(self) -> dict[int, TrainResult]:
        """Each seed's own result."""
        return {seed: m.result for seed, m in zip(self.seeds, self.members, strict=True)}

    def final_by_seed(self) -> dict[str, float]:
        return {
            f"seed_{seed}.{k}": v
            for seed, m in zip(self.seeds, self.members, strict=True)
            for k, v in m.result.final.items()
            if k != "epoch"
        }

    def as_member(self) -> Member:
        """The trial as the one member that stands for it once its seeds have left: its error,
        or its result (the mean over its seeds) with its first seed's net."""
        first = self.members[0]
        try:
            result, error = self.finished(), None
        except Exception as e:  # noqa: BLE001 - the trial's outcome
            result, error = self.result, e
        state = TrainState(first.net, first.optimizer, first.state.shuffle, result)
        return Member(
            first.net, first.optimizer, first.epochs, first.seed, state=state, error=error
        )
