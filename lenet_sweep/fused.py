"""K trials trained as one model, and the single run's CUDA-graph trainer (K = 1).

Each member is a trial with its own net and optimizer (built by models.build: own seed, own
Xavier init), its own lr, epochs and shuffle stream, and its own per-epoch hooks. Their weights are
stacked along a leading K axis and one step trains all of them: the convolutions become grouped
convolutions, one kernel per layer for the whole group (written out by lenet_sweep.stacked for
Sequentials, `vmap(grad_and_value(...))` for any other net), optionally under bf16 autocast. On
CUDA the epoch's steps are captured once as a few CUDA graphs (16 steps, one step, the odd last
batch) that read their batches through a cursor on the device, and replayed through the epoch;
the evaluation is another graph. lr is a (K,) tensor, so nothing is recaptured for a new lr.

After each epoch the group reads its metrics once, copies each member's slice back into that
member's own net, optimizer and shuffle stream, launches the next epoch, and only then runs each
member's hooks on its TrainState, exactly as the eager loop does: checkpoints, MLflow, divergence
and pruning are the same code. On CUDA the next epoch trains while the host runs the hooks (about
10 ms a member an epoch on 2 CPU cores: 0.6 s for 64 members, against 2.2 s of replay on an H200)
and records the members that leave; the hooks read their copies on a side stream, so they never
wait for that replay. A member whose hook raises, or that reaches its epochs, leaves the group;
the others go on. Members that left keep riding along (their results are ignored: one pruned by
this epoch's hooks rides the epoch already launched) until the group has shrunk to half, when it
is compacted and recaptured: a few captures per sweep instead of one per departure. A stop
request (Ctrl-C, SIGTERM) launches no further epoch: this epoch's hooks run, then it stops.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from tqdm import tqdm

from lenet_sweep import signals
from lenet_sweep.data import Split
from lenet_sweep.errors import UserError
from lenet_sweep.fused_optim import FusedOptimizer
from lenet_sweep.optim import Optimizer
from lenet_sweep.stacked import StackedStep, compile_sequential
from lenet_sweep.train import EpochHook, TrainResult, TrainState, mixed, training_begins

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps on a side stream before capture (allocator and cuDNN settle)
STEPS_PER_GRAPH = 16  # steps captured in one graph, replayed through the epoch (replay_plan)


@dataclass
class Member:
    """One trial of a group: its own net/optimizer (built as for a run alone), epochs, hooks."""

    net: nn.Module
    optimizer: Optimizer
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


def check_fusable(net: nn.Module) -> None:
    if list(net.buffers()):
        raise UserError(f"{type(net).__name__} has buffers (BatchNorm?): fused training "
                        "supports models without them; use hydra/launcher=basic")  # fmt: skip


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
        params = {name: torch.stack([dict(m.net.named_parameters())[name].detach()
                                     for m in members]).to(device).contiguous()
                  for name in names}  # fmt: skip
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
        return _Group([self.members[i] for i in keep], self.template, params,
                      self.optim.select(index), [self.shuffles[i] for i in keep],
                      self.perm.index_select(0, index).contiguous())  # fmt: skip


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copied = torch.Generator(device=generator.device)
    copied.set_state(generator.get_state())
    return copied


def _step_functions(template: nn.Module):
    """(step, logits) for a group: written out for Sequentials (lenet_sweep.stacked: 1.15-1.3x
    the steps per second of vmap on an H200), vmapped for any other net."""
    if (forward := compile_sequential(template)) is not None:
        step = StackedStep(forward)
        return step, step.logits

    def loss_and_logits(params, X, y):
        logits = functional_call(template, params, (X,))
        return F.cross_entropy(logits, y), logits

    step = vmap(grad_and_value(loss_and_logits, has_aux=True))
    logits = vmap(lambda params, X: functional_call(template, params, (X,)), in_dims=(0, None))
    return step, logits


def replay_plan(n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """An epoch as graphs of a few steps each, (steps, batch width, replays): up to
    STEPS_PER_GRAPH full batches captured once and replayed, then single full batches, then the
    odd last batch. Capture records each step (3.6 ms a step at K = 1, 7.7 ms at K = 64 on an
    H200: 0.85 and 1.8 s for a whole 235-step epoch); the replays cost what one long graph's did
    (an epoch at K = 64: 2.35 s as 25 replays, 2.37 s as one)."""
    full, last = divmod(n, batch_size)
    chunks, singles = divmod(full, STEPS_PER_GRAPH)
    plan = [(STEPS_PER_GRAPH, batch_size, chunks), (1, batch_size, singles), (1, last, 1)]
    return [(steps, b, times) for steps, b, times in plan if times and b]


class _Epoch:
    """One epoch of a group's steps and its evaluation, eager or as CUDA graphs."""

    def __init__(self, group: _Group, train: Split, test: Split, batch_size: int, graph: bool,
                 autocast: torch.dtype | None = None):  # fmt: skip
        self.group, self.train, self.test, self.batch_size = group, train, test, batch_size
        self.autocast = autocast  # forward and backward in this dtype; weights and sums stay fp32
        self.step_fn, self.logits_fn = _step_functions(group.template)
        device = group.perm.device
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # a graph's next batch
        self.columns = torch.arange(batch_size, device=device)
        self.graphs = self._capture() if graph else None

    def _train_steps(self, starts: Sequence[int] | None = None) -> None:
        g, n, B = self.group, len(self.train), self.batch_size
        g.sums[:2].zero_()
        for start in range(0, n, B) if starts is None else starts:
            self._step(g.perm[:, start : start + B])

    def _cursor_steps(self, steps: int, b: int) -> None:
        """`steps` steps of `b` examples from the cursor on, advancing it: what a graph captures
        (it reads its batches off the device, so one graph serves every chunk of the epoch)."""
        for _ in range(steps):
            self._step(self.group.perm.index_select(1, self.cursor + self.columns[:b]))
            self.cursor += b

    def _step(self, idx: torch.Tensor) -> None:
        """One step of every member on its own batch: `idx` (K, b) indexes the training split."""
        g = self.group
        X, y = self.train.images[idx], self.train.labels[idx]
        with mixed(g.perm.device, self.autocast):
            grads, (loss, logits) = self.step_fn(g.params, X, y)
        g.optim.step(g.params, grads)
        with torch.no_grad():  # sample-weighted sums, as the seed's Accumulator
            g.sums[0] += loss.detach() * y.shape[1]
            g.sums[1] += (logits.argmax(-1) == y).sum(-1)

    def _evaluate(self, starts: Sequence[int] | None = None) -> None:
        g, n, B = self.group, len(self.test), self.batch_size
        g.sums[2].zero_()
        with torch.no_grad():
            for start in range(0, n, B) if starts is None else starts:
                X, y = self.test.images[start : start + B], self.test.labels[start : start + B]
                with mixed(g.perm.device, self.autocast):
                    logits = self.logits_fn(g.params, X)
                g.sums[2] += (logits.argmax(-1) == y).sum(-1)

    def _capture(self) -> tuple[list[tuple[torch.cuda.CUDAGraph, int]], torch.cuda.CUDAGraph]:
        """(the epoch's step graphs with their replay counts, the evaluation's graph)."""
        g = self.group
        saved = [t.clone() for t in g.state_tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm-up on every batch shape, the odd last one too: cuDNN picks its kernels for each
        # shape here (and would autotune them here with cudnn.benchmark), never inside capture.
        n, B = len(self.train), self.batch_size
        starts = sorted({*range(0, min(n, WARMUP_STEPS * B), B), (n - 1) // B * B})
        with torch.cuda.stream(side):
            self._train_steps(starts)
            self._evaluate(sorted({0, (len(self.test) - 1) // B * B}))  # its two shapes
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(g.state_tensors(), saved, strict=True):
            t.copy_(s)  # the warm-up steps never happened
        # One memory pool: the graphs replay in the order captured, each done with its own
        # temporaries before the next starts.
        steps, pool = [], None
        for count, b, times in replay_plan(n, B):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._cursor_steps(count, b)
            pool = pool or graph.pool()
            steps.append((graph, times))
        eval_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(eval_graph, pool=pool):
            self._evaluate()
        return steps, eval_graph

    def launch(self) -> None:
        """Shuffle, train and evaluate one epoch: queued on CUDA (the host goes on meanwhile),
        done on return on the CPU. `collect` reads the result."""
        g, n, device = self.group, len(self.train), self.group.perm.device
        self.marks = [_mark(device)]
        for k, shuffle in enumerate(g.shuffles):  # each member's stream, as the eager loop
            g.perm[k].copy_(torch.randperm(n, device=device, generator=shuffle))
        if self.graphs is None:
            self._train_steps()
        else:
            g.sums[:2].zero_()
            self.cursor.zero_()
            for graph, times in self.graphs[0]:
                for _ in range(times):
                    graph.replay()
        self.marks.append(_mark(device))  # the split between training and evaluation time
        self.graphs[1].replay() if self.graphs else self._evaluate()
        self.marks.append(_mark(device))

    def collect(self) -> tuple[list[list[float]], float, float]:
        """The launched epoch's (3, K) sums, read in one host sync, and the seconds spent
        training and evaluating (on CUDA, between events on the stream: the device's time)."""
        sums = self.group.sums.tolist()
        start, trained, evaluated = self.marks
        if isinstance(start, float):
            return sums, trained - start, evaluated - trained
        return sums, start.elapsed_time(trained) / 1e3, trained.elapsed_time(evaluated) / 1e3


def _mark(device: torch.device):
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def train_group(members: list[Member], train: Split, test: Split, *, batch_size: int,
                graph: bool, progress: bool = False, autocast: torch.dtype | None = None,
                on_leave: Callable[[Member], None] | None = None) -> list[Member]:  # fmt: skip
    """Train every member to its epochs (or until its hooks stop it); see the module docstring.
    Each member's `state.result` holds its history; `error` what stopped it, if anything.
    `on_leave(member)` runs as each member leaves during training, after its hooks (on CUDA
    while the others train): the place for the slow part of recording a finished trial."""
    device = train.labels.device
    training_begins(device)  # on the CPU each step would page its ~75 MB (K=4) in anew
    riding = _start(members, device)
    if not riding:
        return members
    group = _Group.stack(riding, len(train), device)
    new_epoch = functools.partial(_Epoch, train=train, test=test, batch_size=batch_size,
                                  graph=graph and device.type == "cuda", autocast=autocast)  # fmt: skip
    epoch_fn = new_epoch(group)
    bar = tqdm(total=max(m.epochs for m in riding), desc="epochs", leave=False,
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)  # fmt: skip
    hooks_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    epoch_fn.launch()
    while epoch_fn is not None:
        ended = _end_epoch(group, *epoch_fn.collect(), len(train), len(test))
        bar.update()
        if hooks_stream is not None:  # the hooks' reads of the copies wait for the copies only
            hooks_stream.wait_stream(torch.cuda.current_stream(device))
        # The next epoch of every member that may go on, launched before this epoch's hooks:
        # on CUDA it trains while they run (a member they stop rides it in vain).
        active = [k for k, m in enumerate(group.members) if not (m.done or m.error)]
        if not active:
            epoch_fn = None
        elif len(active) <= len(group.members) // 2:  # compact: half the work, one recapture
            group = group.compacted(active)
            epoch_fn = new_epoch(group)
        if epoch_fn is not None and not signals.pending():  # a stop: this epoch's hooks, no more
            epoch_fn.launch()
        with torch.cuda.stream(hooks_stream) if hooks_stream else contextlib.nullcontext():
            for m in ended:
                _run_hooks(m)
                if on_leave is not None and (m.done or m.error):
                    on_leave(m)
        if hooks_stream is not None:  # the next copies into the members' nets wait for the hooks
            torch.cuda.current_stream(device).wait_stream(hooks_stream)
        signals.check()  # Ctrl-C / SIGTERM: stop at the epoch boundary
    bar.close()
    return members


def _start(members: list[Member], device: torch.device) -> list[Member]:
    """Each member's TrainState (restored from its checkpoint if resumed); those with epochs
    left to train."""
    for m in members:
        check_fusable(m.net)
        shuffle = torch.Generator(device=device).manual_seed(m.seed)
        result = m.resume.restore(m.net, m.optimizer, shuffle) if m.resume else TrainResult()
        m.state = TrainState(m.net, m.optimizer, shuffle, result)
        m.done = m.state.epoch >= m.epochs
    return [m for m in members if not m.done]


def _end_epoch(group: _Group, sums: list[list[float]], train_s: float, eval_s: float, n: int,
               n_test: int) -> list[Member]:  # fmt: skip
    """The epoch of each member that rode it, as the eager loop ends one but for the hooks:
    stats, log line, its own copy of weights, optimizer and shuffle state. Returns those members."""
    ended = [(k, m) for k, m in enumerate(group.members) if not (m.done or m.error)]
    for k, m in ended:
        result = m.state.result
        result.train_time_s += train_s  # the group's epoch: each member's time
        result.eval_time_s += eval_s
        result.examples_seen += n
        loss = sums[0][k] / n  # NaN/inf stay NaN/inf: the divergence hook reads them
        stats = {"epoch": m.state.epoch + 1, "test_acc": sums[2][k] / n_test,
                 "train_loss": loss, "train_acc": sums[1][k] / n}  # fmt: skip
        result.history.append(stats)
        log.info("%sepoch %d/%d: train loss %.4f, train acc %.4f, test acc %.4f",
                 f"{m.name}: " if m.name else "", stats["epoch"], m.epochs, stats["train_loss"],
                 stats["train_acc"], stats["test_acc"])  # fmt: skip
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


def train_graphed(net: nn.Module, optimizer: Optimizer, train: Split, test: Split, *,
                  epochs: int, batch_size: int, seed: int, progress: bool = True,
                  hooks: Sequence[EpochHook] = (), resume=None,
                  autocast: torch.dtype | None = None) -> TrainResult:  # fmt: skip
    """train.train with each epoch replayed as CUDA graphs (a group of one): the same numbers,
    hooks and checkpoints, read at epoch boundaries."""
    member = Member(net, optimizer, epochs, seed, hooks, resume)
    train_group([member], train, test, batch_size=batch_size, graph=True, progress=progress,
                autocast=autocast)  # fmt: skip
    if member.error is not None:
        raise member.error
    return member.result
