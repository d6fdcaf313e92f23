"""K trials trained as one model, and the single run's CUDA-graph trainer (K = 1).

Each member is a trial with its own net and optimizer (built as for a run alone: own seed, own
Xavier init), its own lr, epochs and shuffle stream, and its own per-epoch hooks. Their weights
are stacked along a leading K axis and one step trains all of them (lenet_sweep.fused.epoch).

After each epoch the group reads its metrics once, copies each member's slice back into its own
net, optimizer and shuffle stream, launches the next epoch, and only then runs each member's
hooks on its TrainState, as the eager loop does (on CUDA while the next epoch trains; the hooks
read their copies on a side stream). A member whose hook raises, or that reaches its epochs,
leaves; the others go on. Members that left ride along (ignored) until the group has shrunk to
half, when it is compacted and recaptured: a few captures a sweep, not one per departure. A stop
request (Ctrl-C, SIGTERM) launches no further epoch: this epoch's hooks run, then it stops.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lenet_sweep import signals
from lenet_sweep.core import state as states
from lenet_sweep.core.data import Split
from lenet_sweep.core.state import EpochHook, TrainResult, TrainState
from lenet_sweep.errors import UserError
from lenet_sweep.fused.epoch import Epoch
from lenet_sweep.fused.optim import FusedOptimizer


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


@dataclass
class Occupancy:
    """How busy a group's slots were: epochs trained by live members, of its K slots times its
    epochs (a slot whose member left is idle: it rides along, or the group compacted)."""

    live_epochs: int = 0
    slot_epochs: int = 0

    @property
    def share(self) -> float:
        return self.live_epochs / self.slot_epochs if self.slot_epochs else 1.0


def check_fusable(net: nn.Module) -> None:
    if list(net.buffers()):
        raise UserError(
            f"{type(net).__name__} has buffers (BatchNorm?): fused training "
            "supports models without them; use hydra/launcher=basic"
        )


@dataclass
class _Group:
    """The stacked state of the members still riding in the group (all on one device)."""

    members: list[Member]
    template: nn.Module  # structure only (meta device), for functional_call
    params: dict[str, torch.Tensor]
    optim: FusedOptimizer
    shuffles: list[torch.Generator]  # the group's own: a member's stream is the copy its hooks see
    perm: torch.Tensor  # (K, n): this epoch's order of each member
    sums: torch.Tensor = field(init=False)  # (3, K): train loss sum, train correct, test correct

    def __post_init__(self):
        self.sums = torch.zeros(3, len(self.members), device=self.perm.device)

    @classmethod
    def stack(cls, members: list[Member], n: int, device: torch.device) -> _Group:
        names = [name for name, _ in members[0].net.named_parameters()]
        params = {
            name: torch.stack([dict(m.net.named_parameters())[name].detach() for m in members])
            .to(device)
            .contiguous()
            for name in names
        }
        template = copy.deepcopy(members[0].net).to("meta")
        optim = FusedOptimizer.stack([m.optimizer for m in members], params)
        shuffles = [_copy_generator(m.state.shuffle) for m in members]
        perm = torch.zeros(len(members), n, dtype=torch.long, device=device)  # valid for warm-up
        return cls(members, template, params, optim, shuffles, perm)

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.optim.tensors()]

    def unstack(self, k: int) -> None:
        """Member k's slice back into its own net, optimizer and shuffle stream: what its hooks
        see, and keep seeing while the next epoch trains on the group's tensors."""
        member = self.members[k]
        with torch.no_grad():
            for name, p in member.net.named_parameters():
                p.copy_(self.params[name][k])
        self.optim.unstack(k, member.optimizer)
        member.state.shuffle.set_state(self.shuffles[k].get_state())

    def compacted(self, keep: list[int]) -> _Group:
        index = torch.tensor(keep, device=self.perm.device)
        params = {k: v.index_select(0, index).contiguous() for k, v in self.params.items()}
        return _Group(
            [self.members[i] for i in keep],
            self.template,
            params,
            self.optim.select(index),
            [self.shuffles[i] for i in keep],
            self.perm.index_select(0, index).contiguous(),
        )


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copied = torch.Generator(device=generator.device)
    copied.set_state(generator.get_state())
    return copied


def train_group(
    members: list[Member],
    train: Split,
    test: Split,
    *,
    batch_size: int,
    graph: bool,
    progress: bool = False,
    autocast: torch.dtype | None = None,
    on_leave: Callable[[Member], None] | None = None,
) -> Occupancy:
    """Train every member to its epochs (or until its hooks stop it); see the module docstring.
    Each member's `state.result` holds its history; `error` what stopped it, if anything.
    `on_leave(member)` runs as each member leaves during training, after its hooks (on CUDA
    while the others train): the place for the slow part of recording a finished trial.
    Returns how busy the group's slots were."""
    device = train.labels.device
    riding, occupancy = _start(members, device), Occupancy()
    if not riding:
        return occupancy
    group = _Group.stack(riding, len(train), device)
    new_epoch = functools.partial(
        Epoch,
        train=train,
        test=test,
        batch_size=batch_size,
        graph=graph and device.type == "cuda",
        autocast=autocast,
    )
    epoch_fn = new_epoch(group)
    bar = states.progress_bar(max(m.epochs for m in riding), "epochs", progress)
    hooks_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    epoch_fn.launch()
    while epoch_fn is not None:
        occupancy.slot_epochs += len(riding)
        ended = _end_epoch(group, *epoch_fn.collect(), len(train), len(test))
        occupancy.live_epochs += len(ended)
        bar.update()
        if hooks_stream is not None:  # the hooks' reads of the copies wait for the copies only
            hooks_stream.wait_stream(torch.cuda.current_stream(device))
        group, epoch_fn = _next_epoch(group, epoch_fn, new_epoch)
        with torch.cuda.stream(hooks_stream) if hooks_stream else contextlib.nullcontext():
            for m in ended:
                _run_hooks(m)
                if on_leave is not None and (m.done or m.error):
                    on_leave(m)
        if hooks_stream is not None:  # the next copies into the members' nets wait for the hooks
            torch.cuda.current_stream(device).wait_stream(hooks_stream)
        signals.check()  # Ctrl-C / SIGTERM: stop at the epoch boundary
    bar.close()
    return occupancy


def _next_epoch(group: _Group, epoch_fn: Epoch, new_epoch) -> tuple[_Group, Epoch | None]:
    """Launch the next epoch of every member that may go on, before this epoch's hooks: on CUDA
    it trains while they run (a member they stop rides it in vain). None when all have left."""
    active = [k for k, m in enumerate(group.members) if not (m.done or m.error)]
    if not active:
        return group, None
    if len(active) <= len(group.members) // 2:  # compact: half the work, one recapture
        group = group.compacted(active)
        epoch_fn = new_epoch(group)
    if not signals.pending():  # a stop: this epoch's hooks, no more
        epoch_fn.launch()
    return group, epoch_fn


def _start(members: list[Member], device: torch.device) -> list[Member]:
    """Each member's TrainState (restored from its checkpoint if resumed); those with epochs
    left to train."""
    for m in members:
        check_fusable(m.net)
        m.state = states.start(m.net, m.optimizer, m.seed, device, m.resume)
        m.done = m.state.epoch >= m.epochs
    return [m for m in members if not m.done]


def _end_epoch(
    group: _Group, sums: list[list[float]], train_s: float, eval_s: float, n: int, n_test: int
) -> list[Member]:
    """The epoch of each member that rode it, as the eager loop ends one but for the hooks:
    stats, log line, its own copy of weights, optimizer and shuffle state. Returns those members."""
    ended = [(k, m) for k, m in enumerate(group.members) if not (m.done or m.error)]
    for k, m in ended:
        m.state.result.train_time_s += train_s  # the group's epoch: each member's time
        m.state.result.eval_time_s += eval_s
        # NaN/inf losses stay NaN/inf: the divergence hook reads them.
        stats = states.end_epoch(
            m.state, sums[0][k], sums[1][k], sums[2][k] / n_test, n, m.epochs, m.name
        )
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
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Split,
    test: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    hooks: Sequence[EpochHook] = (),
    resume=None,
    autocast: torch.dtype | None = None,
) -> TrainResult:
    """core.train.train with each epoch replayed as CUDA graphs (a group of one): the same
    numbers, hooks and checkpoints, read at epoch boundaries."""
    member = Member(net, optimizer, epochs, seed, hooks, resume)
    train_group(
        [member],
        train,
        test,
        batch_size=batch_size,
        graph=True,
        progress=progress,
        autocast=autocast,
    )
    if member.error is not None:
        raise member.error
    return member.result
