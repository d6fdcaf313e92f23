"""One epoch of a fused group's steps and its evaluation, eager or as CUDA graphs.

On CUDA the epoch's steps are captured once as a few graphs (up to STEPS_PER_GRAPH steps, one
step, the odd last batch) that read their batches through a cursor on the device, and replayed
through the epoch; the evaluation is another graph. lr is a (K,) tensor, so a new lr needs no
new capture.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from lenet_sweep import signals
from lenet_sweep.core.data import Splits
from lenet_sweep.core.state import TRAIN_SUMS, StepSpec, eval_sums
from lenet_sweep.core.train import mixed
from lenet_sweep.fused.stacked import StackedStep, compile_sequential

WARMUP_STEPS = 3  # eager steps on a side stream before capture (allocator and cuDNN settle)
STEPS_PER_GRAPH = 16  # steps captured in one graph, replayed through the epoch (replay_plan)


def _step_functions(template: nn.Module):
    """(step, logits) for a group: written out for Sequentials (lenet_sweep.fused.stacked: faster
    than vmap on a GPU), vmapped for any other net."""
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
    odd last batch. Capture records every step it captures, so short graphs capture fast, and
    their replays cost what one long graph's would (docs/performance.md)."""
    full, last = divmod(n, batch_size)
    chunks, singles = divmod(full, STEPS_PER_GRAPH)
    plan = [(STEPS_PER_GRAPH, batch_size, chunks), (1, batch_size, singles), (1, last, 1)]
    return [(steps, b, times) for steps, b, times in plan if times and b]


class Epoch:
    """One epoch of a group's steps and its evaluation, eager or as CUDA graphs."""

    def __init__(self, group, data: Splits, spec: StepSpec):
        self.group, self.train, self.evaluated = group, data.train, data.evaluated()
        self.batch_size, self.autocast = spec.batch_size, spec.autocast  # weights, sums: fp32
        graph = spec.graph and group.perm.device.type == "cuda"
        self.sums = group.sums_for(self.evaluated)
        self.step_fn, self.logits_fn = _step_functions(group.template)
        device = group.perm.device
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # a graph's next batch
        self.columns = torch.arange(spec.batch_size, device=device)
        self.graphs = self._capture() if graph else None

    def _zero(self, keys) -> None:
        for key in keys:
            self.sums[key].zero_()

    def _train_steps(self, starts: Sequence[int] | None = None) -> None:
        g, n, B = self.group, len(self.train), self.batch_size
        self._zero(TRAIN_SUMS)
        for start in range(0, n, B) if starts is None else starts:
            self._step(g.perm[:, start : start + B])
            signals.check()  # Ctrl-C / SIGTERM between the steps of a long group's epoch

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
            self.sums["train_loss"] += loss.detach() * y.shape[1]
            self.sums["train_acc"] += (logits.argmax(-1) == y).sum(-1)

    def _evaluate(self, starts: dict[str, Sequence[int]] | None = None) -> None:
        """Each evaluated split's sums (core.state.EVAL_SUMS) for every member; `starts`: only
        those batches of each split (the warm-up's shapes)."""
        g, B = self.group, self.batch_size
        self._zero(eval_sums(self.evaluated))
        with torch.no_grad():
            for name, split in self.evaluated.items():
                batches = range(0, len(split), B) if starts is None else starts[name]
                for start in batches:
                    X, y = split.images[start : start + B], split.labels[start : start + B]
                    with mixed(g.perm.device, self.autocast):
                        logits = self.logits_fn(g.params, X)  # (K, b, classes)
                    self.sums[f"{name}_acc"] += (logits.argmax(-1) == y).sum(-1)
                    losses = F.cross_entropy(
                        logits.flatten(0, 1).float(), y.repeat(len(logits)), reduction="none"
                    )
                    self.sums[f"{name}_loss"] += losses.view(len(logits), -1).sum(1)

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
            self._evaluate(
                {k: sorted({0, (len(s) - 1) // B * B}) for k, s in self.evaluated.items()}
            )
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
        self.marks = [mark(device)]
        for k, shuffle in enumerate(g.shuffles):  # each member's stream, as the eager loop
            g.perm[k].copy_(torch.randperm(n, device=device, generator=shuffle))
        if self.graphs is None:
            self._train_steps()
        else:
            self._zero(TRAIN_SUMS)
            self.cursor.zero_()
            for graph, times in self.graphs[0]:
                for _ in range(times):
                    graph.replay()
        self.marks.append(mark(device))  # the split between training and evaluation time
        self.graphs[1].replay() if self.graphs else self._evaluate()
        self.marks.append(mark(device))

    def collect(self) -> tuple[dict[str, list[float]], float, float]:
        """The launched epoch's sums by name (K values each), read in one host sync, and the
        seconds spent training and evaluating (on CUDA, between events on the stream)."""
        read = torch.stack(list(self.sums.values())).tolist()
        sums = dict(zip(self.sums, read, strict=True))
        start, trained, evaluated = self.marks
        if isinstance(start, float):
            return sums, trained - start, evaluated - trained
        return sums, start.elapsed_time(trained) / 1e3, trained.elapsed_time(evaluated) / 1e3


def mark(device: torch.device):
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
