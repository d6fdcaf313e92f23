"""K nets of one Sequential run as one: the fused step written out instead of vmapped.

`vmap` turns each convolution into a grouped one too, but it keeps NCHW, and on a GPU cuDNN then
loops over the K groups for the input gradient and transposes to NHWC and back around every call.
Written out, the K members' activations live side by side as channels, (B, K*C, H, W), and
dense layers are batched matmuls over (K, B, F). (On the GPU channels-last made it slower: 0.8 M
against 1.55 M trial-examples/s for 64 members on an H200; on the CPU it is faster.) The
arithmetic is the members' own: each member's loss is its batch mean and its gradient only its
own.

On CUDA a 2x2/stride-2 average pool runs as a reshape and a mean: the same numbers as
AvgPool2d, and its backward is a broadcast instead of avg_pool2d's slow backward kernel. On the
CPU it is cpu_kernels' C pool (the same numbers again), or AvgPool2d where that is not built;
there the first convolution, one image channel per member, is cpu_kernels' too.

Supported: nn.Sequential of Conv2d (zero padding), Linear, Flatten, elementwise activations and
2-D pools, i.e. lenet and lenet_relu. Anything else returns None from `compile_sequential`, and
the fused trainer falls back to vmap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lenet_sweep import cpu_kernels
from lenet_sweep.models import to_channels_last

ELEMENTWISE = (nn.Sigmoid, nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Identity)
POOLS = (nn.AvgPool2d, nn.MaxPool2d)
Params = dict[str, torch.Tensor]
Layer = Callable[[Params, torch.Tensor], torch.Tensor]


def _conv(name: str, conv: nn.Conv2d) -> Layer:
    in_c = cpu_kernels.is_conv5x5_of_one_channel(conv)  # each member's image a group of one

    def layer(params: Params, x: torch.Tensor) -> torch.Tensor:  # x: (B, K*C, H, W)
        w = params[f"{name}.weight"]  # (K, O, C/groups, kh, kw)
        k = w.shape[0]
        b = params.get(f"{name}.bias")
        w = w.reshape(-1, *w.shape[2:])
        if in_c and cpu_kernels.conv_runs_in_c(x, w):
            return cpu_kernels.conv5x5_per_channel(x, w, None if b is None else b.reshape(-1),
                                                   _pair(conv.padding)[0])  # fmt: skip
        if x.device.type == "cpu" and x.shape[1] == 1:
            # Channels-last, as models.place puts a net's: one member's single-channel input
            # says no layout, and oneDNN then ran its whole first block NCHW (a step of one
            # member 12.3 -> 10.7 ms, the eager loop's). Any other input says it itself.
            w = w.to(memory_format=torch.channels_last)
        return F.conv2d(x, w, None if b is None else b.reshape(-1),
                        conv.stride, conv.padding, conv.dilation, k * conv.groups)  # fmt: skip

    return layer


def _pool(pool: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A 2x2/stride-2 AvgPool2d as reshape+mean (the CPU: cpu_kernels'); any other pool as itself."""
    if not cpu_kernels.is_pool2x2(pool):
        return pool

    def mean_pool(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if x.device.type == "cpu":  # faster than a mean there (NCHW: 1.2 against 7.8 ms forward)
            return cpu_kernels.avg_pool2x2(x)
        if h % 2 or w % 2 or not x.is_contiguous():
            return pool(x)
        return x.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))

    return mean_pool


def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K*C, H, W) -> (K, B, C*H*W): each member's features in its own C, H, W order. On the
    CPU the gradient goes back channels-last, as `models.channels_last_gradients` says why."""
    if (
        x.requires_grad
        and x.device.type == "cpu"
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        x.register_hook(to_channels_last)
    return x.reshape(x.shape[0], k, -1).transpose(0, 1)


def _linear(name: str) -> Layer:
    def layer(params: Params, x: torch.Tensor) -> torch.Tensor:  # x: (K, B, I)
        w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
        if b is None:
            return torch.bmm(x, w.transpose(1, 2))
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    return layer


def compile_sequential(net: nn.Module) -> Callable[[Params, torch.Tensor], torch.Tensor] | None:
    """forward(params, X) for K stacked members: params as (K, ...) tensors named as in
    `net.named_parameters()`, X as (B, K*C, H, W); returns logits (K, B, O). None when `net` has
    a layer this module does not know."""
    if not isinstance(net, nn.Sequential):
        return None
    layers: list[tuple[str, object]] = []
    for name, module in net.named_children():
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            layers.append(("grouped", _conv(name, module)))
        elif isinstance(module, nn.Linear):
            layers.append(("batched", _linear(name)))
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            layers.append(("flatten", None))
        elif isinstance(module, ELEMENTWISE):
            layers.append(("any", module))
        elif isinstance(module, POOLS):
            layers.append(("pool", _pool(module)))
        else:
            return None
    kinds = [kind for kind, _ in layers]
    if "flatten" not in kinds:
        return None
    cut = kinds.index("flatten")
    if "batched" in kinds[:cut] or "grouped" in kinds[cut:]:
        return None
    if "pool" in kinds[cut:]:
        return None  # a pool after Flatten would pool across members

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        k = next(iter(params.values())).shape[0]
        for kind, layer in layers:
            if kind == "flatten":
                x = _flatten(x, k)
            elif kind in ("any", "pool"):
                x = layer(x)
            else:
                x = layer(params, x)
        return x

    return forward


def grouped_input(X: torch.Tensor, k: int) -> torch.Tensor:
    """Each member's batch, (K, B, C, H, W), or one batch for all, (B, C, H, W), as the
    (B, K*C, H, W) input of the grouped convolutions."""
    if X.dim() == 4:
        X = X.unsqueeze(0).expand(k, *X.shape)
    X = X.transpose(0, 1).reshape(X.shape[1], -1, *X.shape[3:])
    # The CPU's oneDNN runs the grouped convolutions channels-last 1.6x faster (4 members, 2
    # cores); cuDNN the other way round (see above).
    cpu = X.device.type == "cpu"
    return X.contiguous(memory_format=torch.channels_last if cpu else torch.contiguous_format)


class StackedStep:
    """The fused step's two functions, as `vmap(grad_and_value(...))` gives them: per-member
    gradients, losses and logits for K batches, and logits for one shared batch."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, params: Params, X: torch.Tensor, y: torch.Tensor):
        k = y.shape[0]
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        logits = self.forward(leaves, grouped_input(X, k))  # (K, B, O)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        loss = losses.view(y.shape).mean(1)  # (K,): each member's batch mean
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), (loss.detach(), logits.detach())

    def logits(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        k = next(iter(params.values())).shape[0]
        return self.forward(params, grouped_input(X, k))
