"""K nets of one Sequential run as one: the fused step written out instead of vmapped.

`vmap` turns each convolution into a grouped one too, but it keeps NCHW, and on a GPU cuDNN then
loops over the K groups for the input gradient and transposes to NHWC and back around every call.
Written out, the K members' activations live side by side as channels, (B, K*C, H, W), and
dense layers are batched matmuls over (K, B, F): NCHW on a GPU, channels-last on the CPU
(lenet_sweep.speed), whichever of the two is faster there. Each member's loss is its batch mean
and its gradient only its own.

On CUDA a 2x2/stride-2 average pool runs as a reshape and a mean: the same numbers as
AvgPool2d, and its backward is a broadcast instead of avg_pool2d's slow backward kernel.

Supported: nn.Sequential of Conv2d (zero padding), Linear, Flatten, elementwise activations and
2-D pools, i.e. lenet and lenet_relu. Anything else returns None from `compile_sequential`, and
the fused trainer falls back to vmap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lenet_sweep import speed

ELEMENTWISE = (nn.Sigmoid, nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Identity)
POOLS = (nn.AvgPool2d, nn.MaxPool2d)
Params = dict[str, torch.Tensor]
Layer = Callable[[Params, torch.Tensor], torch.Tensor]


def _conv(name: str, conv: nn.Conv2d) -> Layer:
    def layer(params: Params, x: torch.Tensor) -> torch.Tensor:  # x: (B, K*C, H, W)
        w = params[f"{name}.weight"]  # (K, O, C/groups, kh, kw)
        k = w.shape[0]
        b = params.get(f"{name}.bias")
        w = w.reshape(-1, *w.shape[2:])
        if x.shape[1] == 1 and speed.channels_last(x.device):
            # One member's single-channel input says no layout: the weight says channels-last.
            w = w.to(memory_format=torch.channels_last)
        bias = None if b is None else b.reshape(-1)
        return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, k * conv.groups)

    return layer


def _is_pool2x2(pool: nn.Module) -> bool:
    return (
        type(pool) is nn.AvgPool2d
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and not pool.ceil_mode
        and pool.divisor_override is None
    )


def _pool(pool: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A 2x2/stride-2 AvgPool2d on CUDA as reshape+mean; any other pool, or the CPU, as itself."""
    if not _is_pool2x2(pool):
        return pool

    def mean_pool(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if x.device.type != "cuda" or h % 2 or w % 2 or not x.is_contiguous():
            return pool(x)
        return x.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))

    return mean_pool


def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K*C, H, W) -> (K, B, C*H*W): each member's features in its own C, H, W order. A
    channels-last input gets its gradient back channels-last (lenet_sweep.speed says why)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    if x.requires_grad and x.device.type == "cpu" and channels_last:
        x.register_hook(speed.to_channels_last)
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
    # The CPU's oneDNN runs grouped convolutions faster channels-last, cuDNN the other way round.
    layout = torch.channels_last if speed.channels_last(X.device) else torch.contiguous_format
    return X.contiguous(memory_format=layout)


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
