"""2x2/stride-2 average pools on the CPU through a small C kernel (lenet_sweep/_pool2x2.c).

Why: ATen's channels-last avg_pool2d vectorises over channels, 16 floats at a time, and LeNet's
first pool has 6 (a fused group's, 6 per member), so both of its kernels run scalar loops with
index arithmetic per element: 0.71 ms forward and 0.55 ms backward for a batch of 256 on 2
cores. The C loops do the same arithmetic in the same order (each output the sum of its window
from zero, then divided by 4; each input's gradient zero plus its output's gradient over 4), so
the bits are the same, in 0.09 and 0.11 ms (alone; 0.3 and 0.35 ms inside a step, whose memory
is colder). They run on torch's own OpenMP threads, as many as torch uses.

pip builds the kernel at install (a C compiler with OpenMP: gcc); where it is missing, or for
any other pool, layout, dtype or device, `avg_pool2x2` is `F.avg_pool2d`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

try:  # built by pip from _pool2x2.c; optional (no compiler: torch's pool, the same numbers)
    from lenet_sweep import _pool2x2
except ImportError:
    _pool2x2 = None


def built() -> bool:
    """Whether pip built the C kernel for this interpreter."""
    return _pool2x2 is not None


def is_pool2x2(module: nn.Module) -> bool:
    """An nn.AvgPool2d that averages disjoint 2x2 windows (LeNet's)."""
    return (type(module) is nn.AvgPool2d and _pair(module.kernel_size) == (2, 2)
            and _pair(module.stride) == (2, 2) and _pair(module.padding) == (0, 0)
            and not module.ceil_mode and module.divisor_override is None)  # fmt: skip


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2, 2), through the C kernel where it applies."""
    if _runs_in_c(x):
        return _AvgPool2x2.apply(x)
    return F.avg_pool2d(x, 2, 2)


def _runs_in_c(x: torch.Tensor) -> bool:
    return (built() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and x.is_contiguous(memory_format=torch.channels_last))  # fmt: skip


class _AvgPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        ctx.input_shape = x.shape
        y = torch.empty((n, c, h // 2, w // 2), memory_format=torch.channels_last)
        _pool2x2.forward(x.data_ptr(), y.data_ptr(), n, h, w, c, torch.get_num_threads())
        return y

    @staticmethod
    def backward(ctx, grad):
        n, c, h, w = ctx.input_shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty(ctx.input_shape, memory_format=torch.channels_last)
        _pool2x2.backward(grad.data_ptr(), grad_x.data_ptr(), n, h, w, c,
                          torch.get_num_threads())  # fmt: skip
        return grad_x


@contextlib.contextmanager
def c_pools(net: nn.Module):
    """While training on the CPU: the net's 2x2 average pools run `avg_pool2x2`. Set on the
    modules for the duration and removed after, so the net pickles as a plain nn.Module (a
    logged model)."""
    pools = [m for m in net.modules() if is_pool2x2(m)] if built() else []
    for pool in pools:
        pool.forward = avg_pool2x2
    try:
        yield
    finally:
        for pool in pools:
            del pool.forward
