"""K trials trained as one model, and the single run's CUDA-graph trainer (K = 1).

Each member is a trial with its own net and optimizer (built as for a run alone: own seed, own
Xavier init), its own lr, epochs and shuffle stream, and its own per-epoch hooks. Their weights
are stacked along a leading K axis and one step trains all of them (lenet_sweep.fused.epoch).

After each epoch the group reads its metrics once, copies each member's slice back into its own
net, optimizer and shuffle stream, launches the next epoch, and only then runs each member's
hooks on its TrainState, as the eager loop does (on CUDA while the next epoch trains; the hooks
read their copies on a side stream; the CPU trains as it launches, so there the hooks run first).
A member whose hook raises, or that reaches its epochs, leaves; the others go on. With `refill`,
its slot takes the next trial at the boundary: the newcomer's weights, optimizer state, lr and
shuffle stream are written into the slot's slice in place, so a captured epoch replays it as is.
Slots nothing refills ride along (ignored) until the group has shrunk to half, when it is
compacted and recaptured: a few captures a sweep, not one per departure. A stop request (Ctrl-C,
SIGTERM) launches no further epoch: this epoch's hooks run, then it stops.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
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


def train_group(
    members: list[Member],
    data: Splits,
    spec: StepSpec,
    *,
    on_leave: Callable[[Member], None] | None = None,
    refill: Callable[[int], Member | None] | None = None,
    occupancy: Occupancy | None = None,
) -> Occupancy:
    """Train every member to its epochs (or until its hooks stop it); see the module docstring.
    Each member's `state.result` holds its history; `error` what stopped it, if anything.
    `on_leave(member)` runs as each member leaves, after its hooks (on CUDA while the others
    train): the place for the slow part of recording a finished trial. `refill(slot)` gives the
    member that takes a freed slot, None once there is none (the group's tail begins). Returns
    how busy the group's slots were (counted into `occupancy` as it goes, if given)."""
    device = data.train.labels.device
    occupancy = occupancy if occupancy is not None else Occupancy()
    riding = start_members(members, device, on_leave)
    if not riding:
        return occupancy
    group = Group.stack(riding, len(data.train), device)
    slots = _SlotRefill(group, refill, on_leave, device)
    new_epoch = functools.partial(Epoch, data=data, spec=spec)
    epoch_fn = new_epoch(group)
    bar = states.progress_bar(max(m.epochs for m in riding), "epochs", spec.progress)
    hooks_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    epoch_fn.launch()
    while epoch_fn is not None:
        sums, train_s, eval_s = epoch_fn.collect()
        ended = _end_epoch(group, sums, train_s, eval_s, data.sizes())
        occupancy.add(len(ended), len(riding), tail=slots.tail)
        occupancy.train_s += train_s
        bar.update()
        if hooks_stream is None:  # the CPU trains as it launches: hooks first, their slots refill
            slots.leave(ended)
            group, epoch_fn = _next_epoch(slots, epoch_fn, new_epoch)
        else:  # the next epoch trains while the hooks run; the hooks read their copies only
            hooks_stream.wait_stream(torch.cuda.current_stream(device))
            group, epoch_fn = _next_epoch(slots, epoch_fn, new_epoch)
            with torch.cuda.stream(hooks_stream):
                slots.leave(ended)
            torch.cuda.current_stream(device).wait_stream(hooks_stream)
        signals.check()  # Ctrl-C / SIGTERM: stop at the epoch boundary
    bar.close()
    return occupancy


@dataclass
class _SlotRefill:
    """A group's slots through training: who leaves, who takes a freed slot."""

    group: Group
    refill: Callable[[int], Member | None] | None
    on_leave: Callable[[Member], None] | None
    device: torch.device
    tail: bool = False  # refill had nothing left

    def leave(self, ended: list[Member]) -> None:
        """Each member's hooks on the epoch it ended; then those that leave are handed on (a
        hook may stop another member: a repeated trial's seeds stop together)."""
        for m in ended:
            _run_hooks(m)
        for m in ended:
            if self.on_leave is not None and (m.done or m.error):
                self.on_leave(m)

    def refilled(self) -> None:
        """Each freed slot takes refill's next member, until it has none."""
        for k, m in enumerate(self.group.members):
            while self.refill and not self.tail and (m.done or m.error):
                new = self.refill(k)
                if new is None:
                    self.tail = True
                elif start_members([new], self.device, self.on_leave):
                    self.group.write(k, new)
                    m = new


def _next_epoch(slots: _SlotRefill, epoch_fn: Epoch, new_epoch) -> tuple[Group, Epoch | None]:
    """Refill freed slots, then launch the next epoch of every member that may go on (on CUDA
    before this epoch's hooks: it trains while they run, and a member they stop rides it in
    vain). None when all have left."""
    slots.refilled()
    group = slots.group
    active = [k for k, m in enumerate(group.members) if not (m.done or m.error)]
    if not active:
        return group, None
    if len(active) <= len(group.members) // 2:  # the tail: half the work, one recapture
        group = slots.group = group.compacted(active)
        epoch_fn = new_epoch(group)
    if not signals.pending():  # a stop: this epoch's hooks, no more
        epoch_fn.launch()
    return group, epoch_fn


def start_members(members: list[Member], device: torch.device, on_leave=None) -> list[Member]:
    """Each member's TrainState (restored from its checkpoint if resumed); those with epochs
    left to train. One resumed at its end leaves at once."""
    for m in members:
        check_fusable(m.net)
        m.state = states.start(m.net, m.optimizer, m.seed, device, m.resume)
        m.done = m.state.epoch >= m.epochs
        if m.done and on_leave is not None:
            on_leave(m)
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
