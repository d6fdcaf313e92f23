"""K trials trained as one model, and the single run's CUDA-graph trainer (K = 1).

Each member is a trial with its own net and optimizer (built as for a run alone: own seed, own
Xavier init), its own lr, epochs and shuffle stream, and its own per-epoch hooks. Their weights
are stacked along a leading K axis and one step trains all of them (lenet_sweep.fused.epoch).

After each epoch the group reads its metrics once, copies each member's slice back into its own
net, optimizer and shuffle stream, and runs each member's hooks on its TrainState, as the eager
loop does (on CUDA while the next epoch trains: the hooks read their copies on a side stream;
the CPU trains as it launches, so there the hooks run first). A member whose hook raises, or
that reaches its epochs, leaves; the others go on. A scheduler may write a newcomer into a freed
slot at a boundary: its weights, optimizer state, lr and shuffle stream go into the slot's slice
in place, so a captured epoch replays it as is. Slots nothing refills ride along (ignored) until
the group has shrunk to half, when it is compacted and recaptured: a few captures a sweep, not
one per departure. A stop request (Ctrl-C, SIGTERM) launches no further epoch: this epoch's
hooks run, then it stops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lenet_sweep import signals
from lenet_sweep.core import state as states
from lenet_sweep.core.data import Splits
from lenet_sweep.core.state import EpochHook, StepSpec, TrainResult, TrainSpec, TrainState
from lenet_sweep.errors import UserError
from lenet_sweep.fused.epoch import Epoch
from lenet_sweep.fused.group import Group


@dataclass
class Member:
    """One trial of a group: its own net/optimizer (built as for a run alone), epochs, hooks."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    seed: int
    hooks: Sequence[EpochHook] = ()
    resume: object | None = None  # a Checkpoint to continue from
    name: str = ""
    state: TrainState | None = None
    error: BaseException | None = None  # what stopped it (a hook raised), if anything
    done: bool = False

    @property
    def result(self) -> TrainResult:
        return self.state.result

    @classmethod
    def of(cls, net, optimizer, spec: TrainSpec, name: str = "") -> Member:
        """A member that trains as `spec` says: its epochs, seed, hooks and checkpoint."""
        return cls(net, optimizer, spec.epochs, spec.seed, spec.hooks, spec.resume, name)


@dataclass
class Occupancy:
    """How busy a group's slots were: epochs trained by live members, of its K slots times its
    epochs (a slot whose member left is idle: it rides along, or the group compacted); and of
    those, the group's tail: its epochs once nothing was left to refill from."""

    live_epochs: int = 0
    slot_epochs: int = 0
    tail_live: int = 0
    tail_slots: int = 0
    train_s: float = 0.0  # the group's training time, all its epochs

    def add(self, live: int, slots: int, tail: bool) -> None:
        self.live_epochs, self.slot_epochs = self.live_epochs + live, self.slot_epochs + slots
        if tail:
            self.tail_live, self.tail_slots = self.tail_live + live, self.tail_slots + slots

    @property
    def share(self) -> float:
        return self.live_epochs / self.slot_epochs if self.slot_epochs else 1.0


def check_fusable(net: nn.Module) -> None:
    if list(net.buffers()):
        raise UserError(
            f"{type(net).__name__} has buffers (BatchNorm?): fused training "
            "supports models without them; use hydra/launcher=basic"
        )


class GroupTrainer:
    """A fused group's epochs, one boundary at a time: what a scheduler drives (the plain loop
    is `train_group`; a sweep's refilling one is lenet_sweep.job.scheduler). Each boundary:
    `collect` the epoch (each member's stats and own copies), `run_hooks` on those that rode it
    (who leaves: reached its epochs, or a hook raised), `write` newcomers into freed slots,
    `launch` the next epoch. On CUDA `launch` may come before `run_hooks` (`overlaps`): the
    next epoch trains while the hooks read their copies on a side stream."""

    def __init__(self, members: list[Member], data: Splits, spec: StepSpec, occupancy=None):
        self.data, self.spec, self.device = data, spec, data.train.labels.device
        self.occupancy = occupancy if occupancy is not None else Occupancy()
        self.tail = False  # set by a scheduler once nothing is left to refill from
        self.left_at_start = [m for m in members if not start_members([m], self.device)]
        riding = [m for m in members if m not in self.left_at_start]
        self.slots = len(riding)
        self.group = Group.stack(riding, len(data.train), self.device) if riding else None
        self.epoch = Epoch(self.group, data, spec) if riding else None
        self.hooks_stream = torch.cuda.Stream(self.device) if self.overlaps else None
        longest = max((m.epochs for m in riding), default=0)
        self.bar = states.progress_bar(longest, "epochs", spec.progress)
        self.in_flight = False  # an epoch launched, not collected yet

    @property
    def overlaps(self) -> bool:
        return self.device.type == "cuda"

    def free_slots(self) -> list[int]:
        return [k for k, m in enumerate(self.group.members) if m.done or m.error]

    def write(self, slot: int, member: Member) -> bool:
        """A newcomer into a freed slot, in place (a captured epoch replays it as is); False
        when it has nothing to train (resumed at its end): it leaves at once."""
        if not start_members([member], self.device):
            return False
        self.group.write(slot, member)
        return True

    def launch(self) -> bool:
        """The next epoch of every member that may go on (compacted once half the slots idle:
        one recapture for the tail); False when none may, or a stop was requested."""
        active = [k for k, m in enumerate(self.group.members) if not (m.done or m.error)]
        if not active or signals.pending():
            return False
        if len(active) <= len(self.group.members) // 2:
            self.group = self.group.compacted(active)
            self.epoch = Epoch(self.group, self.data, self.spec)
        self.epoch.launch()
        self.in_flight = True
        return True

    def collect(self) -> list[Member]:
        """The launched epoch's end for each member that rode it: stats and log line, its own
        net, optimizer and shuffle stream; returns those members (their hooks not run yet)."""
        sums, train_s, eval_s = self.epoch.collect()
        self.in_flight = False
        ended = _end_epoch(self.group, sums, train_s, eval_s, self.data.sizes())
        if self.hooks_stream is not None:  # the hooks read the copies queued so far, not what
            self.hooks_stream.wait_stream(torch.cuda.current_stream(self.device))  # comes next
        self.occupancy.add(len(ended), self.slots, tail=self.tail)
        self.occupancy.train_s += train_s
        self.bar.update()
        return ended

    def run_hooks(self, ended: list[Member]) -> list[Member]:
        """Each member's hooks on the epoch it ended (on the side stream while the next epoch
        trains); returns those that leave. A hook may stop another member (a run's seeds)."""
        if self.hooks_stream is None:
            return _hooks_of(ended)
        with torch.cuda.stream(self.hooks_stream):
            leaving = _hooks_of(ended)
        torch.cuda.current_stream(self.device).wait_stream(self.hooks_stream)
        return leaving

    def close(self) -> None:
        self.bar.close()


def _hooks_of(ended: list[Member]) -> list[Member]:
    for m in ended:
        _run_hooks(m)
    return [m for m in ended if m.done or m.error]


def train_group(members: list[Member], data: Splits, spec: StepSpec, occupancy=None) -> Occupancy:
    """Train every member to its epochs (or until its hooks stop it), no refill. Each member's
    `state.result` holds its history; `error` what stopped it, if anything."""
    trainer = GroupTrainer(members, data, spec, occupancy)
    if trainer.group is None:
        return trainer.occupancy
    trainer.launch()
    while trainer.in_flight:
        ended = trainer.collect()
        if trainer.overlaps:
            trainer.launch()
        trainer.run_hooks(ended)
        if not trainer.overlaps:
            trainer.launch()
        signals.check()  # Ctrl-C / SIGTERM: stop at the epoch boundary
    trainer.close()
    return trainer.occupancy


def start_members(members: list[Member], device: torch.device) -> list[Member]:
    """Each member's TrainState (restored from its checkpoint if resumed); those with epochs
    left to train. One resumed at its end is done at once."""
    for m in members:
        check_fusable(m.net)
        m.state = states.start(m.net, m.optimizer, m.seed, device, m.resume)
        m.done = m.state.epoch >= m.epochs
    return [m for m in members if not m.done]


def _end_epoch(group: Group, sums: dict, train_s: float, eval_s: float, sizes: dict) -> list:
    """The epoch of each member that rode it, as the eager loop ends one but for the hooks:
    stats, log line, its own copy of weights, optimizer and shuffle state. Returns those members."""
    ended = [(k, m) for k, m in enumerate(group.members) if not (m.done or m.error)]
    for k, m in ended:
        m.state.result.train_time_s += train_s  # the group's epoch: each member's time
        m.state.result.eval_time_s += eval_s
        # NaN/inf losses stay NaN/inf: the divergence hook reads them.
        mine = {key: values[k] for key, values in sums.items()}
        stats = states.end_epoch(m.state, mine, sizes, m.epochs, m.name)
        group.unstack(k)
        m.done = stats["epoch"] >= m.epochs
    return [m for _, m in ended]


def _run_hooks(m: Member) -> None:
    """The member's hooks on its epoch; one that raises stops this member only."""
    try:
        for hook in m.hooks:
            hook(m.state)
    except Exception as e:  # noqa: BLE001 - diverged, pruned, a store error: this member only
        m.error = e


def train_graphed(
    net: nn.Module, optimizer: torch.optim.Optimizer, data: Splits, spec: TrainSpec
) -> TrainResult:
    """core.train.train with each epoch replayed as CUDA graphs (a group of one): the same
    numbers, hooks and checkpoints, read at epoch boundaries."""
    member = Member.of(net, optimizer, spec)
    train_group([member], data, dataclasses.replace(spec, graph=True))
    if member.error is not None:
        raise member.error
    return member.result
