"""K trials trained as one model, and the single run's CUDA-graph trainer (K = 1).

Each member is a trial with its own net and optimizer (built by models.build: own seed, own
Xavier init), its own lr, epochs and shuffle stream, and its own per-epoch hooks. Their weights are
stacked along a leading K axis and one step trains all of them: the convolutions become grouped
convolutions, one kernel per layer for the whole group (written out by lenet_sweep.stacked for
Sequentials, `vmap(grad_and_value(...))` for any other net), optionally under bf16 autocast. On
CUDA each epoch's steps (the odd last batch included) are captured once as a CUDA graph and
replayed; the evaluation is a second graph. lr is a (K,) tensor, so nothing is recaptured for a
new lr.

After each epoch the group reads its metrics once, copies each member's slice back into that
member's own net and optimizer, and runs the member's hooks on its TrainState, exactly as the eager
loop does: checkpoints, MLflow, divergence and pruning are the same code. A member whose hook
raises, or that reaches its epochs, leaves the group; the others go on. Members that left keep
riding along (their results are ignored) until the group has shrunk to half, when it is compacted
and recaptured: a few captures per sweep instead of one per departure.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Sequence
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
from lenet_sweep.stacked import StackedStep, compile_sequential
from lenet_sweep.train import EpochHook, TrainResult, TrainState, mixed

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps on a side stream before capture (allocator and cuDNN settle)


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
    shuffles: list[torch.Generator]
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
        shuffles = [m.state.shuffle for m in members]
        perm = torch.zeros(len(members), n, dtype=torch.long, device=device)  # valid for warm-up
        return cls(members, template, params, optim, shuffles, perm)

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.optim.tensors()]

    def unstack(self, k: int) -> None:
        """Member k's slice back into its own net and optimizer (what its hooks see)."""
        member = self.members[k]
        with torch.no_grad():
            for name, p in member.net.named_parameters():
                p.copy_(self.params[name][k])
        self.optim.unstack(k, member.optimizer)

    def compacted(self, keep: list[int]) -> _Group:
        index = torch.tensor(keep, device=self.perm.device)
        params = {k: v.index_select(0, index).contiguous() for k, v in self.params.items()}
        return _Group([self.members[i] for i in keep], self.template, params,
                      self.optim.select(index), [self.shuffles[i] for i in keep],
                      self.perm.index_select(0, index).contiguous())  # fmt: skip


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


class _Epoch:
    """One epoch of a group's steps and its evaluation, eager or as two CUDA graphs."""

    def __init__(self, group: _Group, train: Split, test: Split, batch_size: int, graph: bool,
                 autocast: torch.dtype | None = None):  # fmt: skip
        self.group, self.train, self.test, self.batch_size = group, train, test, batch_size
        self.autocast = autocast  # forward and backward in this dtype; weights and sums stay fp32
        self.step_fn, self.logits_fn = _step_functions(group.template)
        self.graphs = self._capture() if graph else None

    def _train_steps(self, starts: Sequence[int] | None = None) -> None:
        g, n, B = self.group, len(self.train), self.batch_size
        g.sums[:2].zero_()
        for start in range(0, n, B) if starts is None else starts:
            idx = g.perm[:, start : start + B]  # (K, b): each member's own batch
            X, y = self.train.images[idx], self.train.labels[idx]
            with mixed(g.perm.device, self.autocast):
                grads, (loss, logits) = self.step_fn(g.params, X, y)
            g.optim.step(g.params, grads)
            with torch.no_grad():  # sample-weighted sums, as the seed's Accumulator
                g.sums[0] += loss.detach() * y.shape[1]
                g.sums[1] += (logits.argmax(-1) == y).sum(-1)

    def _evaluate(self) -> None:
        g = self.group
        g.sums[2].zero_()
        with torch.no_grad():
            for X, y in self.test.batches(self.batch_size):
                with mixed(g.perm.device, self.autocast):
                    logits = self.logits_fn(g.params, X)
                g.sums[2] += (logits.argmax(-1) == y).sum(-1)

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
        g = self.group
        saved = [t.clone() for t in g.state_tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm-up on every batch shape, the odd last one too: cuDNN picks its kernels for each
        # shape here (and would autotune them here with cudnn.benchmark), never inside capture.
        n, B = len(self.train), self.batch_size
        last = (n - 1) // B * B
        starts = sorted({*range(0, min(n, WARMUP_STEPS * B), B), last})
        with torch.cuda.stream(side):
            self._train_steps(starts)
            self._evaluate()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(g.state_tensors(), saved, strict=True):
            t.copy_(s)  # the warm-up steps never happened
        train_graph, eval_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(train_graph):
            self._train_steps()
        with torch.cuda.graph(eval_graph, pool=train_graph.pool()):
            self._evaluate()
        return train_graph, eval_graph

    def run(self) -> tuple[list[list[float]], float, float]:
        """Shuffle, train and evaluate one epoch: the (3, K) sums, read in one host sync, and
        the seconds spent training and evaluating."""
        g, n, device = self.group, len(self.train), self.group.perm.device
        start = time.perf_counter()
        for k, shuffle in enumerate(g.shuffles):  # each member's stream, as the eager loop
            g.perm[k].copy_(torch.randperm(n, device=device, generator=shuffle))
        self.graphs[0].replay() if self.graphs else self._train_steps()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the split between training and evaluation time
        trained = time.perf_counter()
        self.graphs[1].replay() if self.graphs else self._evaluate()
        sums = g.sums.tolist()
        return sums, trained - start, time.perf_counter() - trained


def train_group(members: list[Member], train: Split, test: Split, *, batch_size: int,
                graph: bool, progress: bool = False,
                autocast: torch.dtype | None = None) -> list[Member]:  # fmt: skip
    """Train every member to its epochs (or until its hooks stop it); see the module docstring.
    Each member's `state.result` holds its history; `error` what stopped it, if anything."""
    device = train.labels.device
    graph = graph and device.type == "cuda"  # CPU: the same steps, eager
    for m in members:
        check_fusable(m.net)
        shuffle = torch.Generator(device=device).manual_seed(m.seed)
        result = m.resume.restore(m.net, m.optimizer, shuffle) if m.resume else TrainResult()
        m.state = TrainState(m.net, m.optimizer, shuffle, result)
        m.done = m.state.epoch >= m.epochs
    riding = [m for m in members if not m.done]
    if not riding:
        return members
    group = _Group.stack(riding, len(train), device)
    epoch_fn = _Epoch(group, train, test, batch_size, graph, autocast)
    bar = tqdm(total=max(m.epochs for m in riding), desc="epochs", leave=False,
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)  # fmt: skip
    while True:
        signals.check()  # Ctrl-C / SIGTERM: stop at the epoch boundary
        sums, train_s, eval_s = epoch_fn.run()
        bar.update()
        for k, m in enumerate(group.members):
            if not (m.done or m.error):
                m.result.train_time_s += train_s  # the group's epoch: each member's wall time
                m.result.eval_time_s += eval_s
                _end_epoch(group, k, [row[k] for row in sums], len(train), len(test))
        active = [k for k, m in enumerate(group.members) if not (m.done or m.error)]
        if not active:
            break
        if len(active) <= len(group.members) // 2:  # compact: half the work, one recapture
            group = group.compacted(active)
            epoch_fn = _Epoch(group, train, test, batch_size, graph, autocast)
    bar.close()
    return members


def _end_epoch(group: _Group, k: int, sums: list[float], n: int, n_test: int) -> None:
    """Member k's epoch as the eager loop ends one: stats, log line, its hooks."""
    m = group.members[k]
    result = m.state.result
    result.examples_seen += n
    loss = sums[0] / n  # NaN/inf stay NaN/inf: the divergence hook reads them
    stats = {"epoch": m.state.epoch + 1, "test_acc": sums[2] / n_test, "train_loss": loss,
             "train_acc": sums[1] / n}  # fmt: skip
    result.history.append(stats)
    log.info("%sepoch %d/%d: train loss %.4f, train acc %.4f, test acc %.4f",
             f"{m.name}: " if m.name else "", stats["epoch"], m.epochs, stats["train_loss"],
             stats["train_acc"], stats["test_acc"])  # fmt: skip
    group.unstack(k)
    try:
        for hook in m.hooks:
            hook(m.state)
    except Exception as e:  # noqa: BLE001 - diverged, pruned, a store error: this member only
        m.error = e
        return
    m.done = stats["epoch"] >= m.epochs


def train_graphed(net: nn.Module, optimizer: torch.optim.Optimizer, train: Split, test: Split, *,
                  epochs: int, batch_size: int, seed: int, progress: bool = True,
                  hooks: Sequence[EpochHook] = (), resume=None,
                  autocast: torch.dtype | None = None) -> TrainResult:  # fmt: skip
    """train.train with each epoch one CUDA-graph replay (a group of one): the same numbers,
    hooks and checkpoints, read at epoch boundaries."""
    member = Member(net, optimizer, epochs, seed, hooks, resume)
    train_group([member], train, test, batch_size=batch_size, graph=True, progress=progress,
                autocast=autocast)  # fmt: skip
    if member.error is not None:
        raise member.error
    return member.result
