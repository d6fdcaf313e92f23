"""LeNet's first block on the CPU through small C kernels (lenet_sweep/_cpu_kernels.c).

Why: the first block works on 6 channels of 28x28, too few for the kernels torch calls there.
ATen's channels-last avg_pool2d vectorises over channels, 16 floats at a time, so with 6 both of
its pool kernels run scalar loops: 0.71 ms forward and 0.55 ms backward for a batch of 256 on
2 cores. The C pool does the same sums in the same order (each output its window summed from
zero, then divided by 4; each input's gradient zero plus its output's gradient over 4), so the
bits are torch's, in 0.14 and 0.18 ms, in any layout. oneDNN's convolution of the one-channel
image takes 1.2 ms forward and 1.4 ms for the weight gradient; the C one computes each output
channel as 16-float vectors over the zero-padded image (25 multiply-adds each, in tap order)
in 0.58 and 0.68 ms. Its sums are in another order than oneDNN's, so its last bits differ; they
do not depend on the CPU's vector width, and the weight gradient's, summed per thread and then
in a fixed order, not on the run. The convolution writes NCHW (the sigmoid after it does not
care), the pool reads it and writes channels-last for the second convolution, and the pool's
backward hands its gradient back in its input's layout.

All run on torch's own OpenMP threads, as many as torch uses. pip builds the kernels at install
(a C compiler with OpenMP: gcc); where they are missing, or for any other module, layout, dtype
or device, the modules run as torch has them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

try:  # built by pip from _cpu_kernels.c; optional (no compiler: torch's kernels)
    from lenet_sweep import _cpu_kernels
except ImportError:
    _cpu_kernels = None


def built() -> bool:
    """Whether pip built the C kernels for this interpreter."""
    return _cpu_kernels is not None


def _threads() -> int:
    return torch.get_num_threads()


# --- 2x2, stride-2 average pool ---------------------------------------------------------------


def is_pool2x2(module: nn.Module) -> bool:
    """An nn.AvgPool2d that averages disjoint 2x2 windows (LeNet's)."""
    return (type(module) is nn.AvgPool2d and _pair(module.kernel_size) == (2, 2)
            and _pair(module.stride) == (2, 2) and _pair(module.padding) == (0, 0)
            and not module.ceil_mode and module.divisor_override is None)  # fmt: skip


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2, 2), channels-last; through the C kernel where it applies."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    even = x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
    if built() and _cpu_float(x) and dense and even:
        return _AvgPool2x2.apply(x)
    return F.avg_pool2d(x, 2, 2)


def _cpu_float(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


class _AvgPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        ctx.input_shape, ctx.input_strides = x.shape, x.stride()
        y = torch.empty((n, c, h // 2, w // 2), memory_format=torch.channels_last)
        _cpu_kernels.pool_forward(x.data_ptr(), y.data_ptr(), n, c, h, w, x.stride(), y.stride(),
                                  _threads())  # fmt: skip
        return y

    @staticmethod
    def backward(ctx, grad):
        n, c, h, w = ctx.input_shape
        # In the input's own layout: what the layer before it computes its gradient against.
        grad_x = torch.empty_strided(ctx.input_shape, ctx.input_strides)
        _cpu_kernels.pool_backward(grad.data_ptr(), grad_x.data_ptr(), n, c, h, w, grad.stride(),
                                   grad_x.stride(), _threads())  # fmt: skip
        return grad_x


# --- 5x5 convolution of one input channel per group ------------------------------------------


def is_conv5x5_of_one_channel(module: nn.Module) -> bool:
    """An nn.Conv2d from one input channel with a 5x5 kernel, stride 1 (LeNet's first)."""
    return (type(module) is nn.Conv2d and module.in_channels == 1 and module.groups == 1
            and _pair(module.kernel_size) == (5, 5) and _pair(module.stride) == (1, 1)
            and _pair(module.dilation) == (1, 1) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and _pair(module.padding)[0] == _pair(module.padding)[1])  # fmt: skip


def conv5x5_per_channel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        padding: int) -> torch.Tensor:  # fmt: skip
    """F.conv2d(x, weight, bias, 1, padding, groups=x's channels) for 5x5 weights with one input
    channel per group (LeNet's first convolution; a fused group's, each member a group), through
    the C kernel for a float32 CPU image that needs no gradient (the data: it computes none)."""
    if not conv_runs_in_c(x, weight):
        return F.conv2d(x, weight, bias, 1, padding, 1, x.shape[1])
    return _Conv5x5PerChannel.apply(x, weight, bias, padding)


def conv_runs_in_c(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `conv5x5_per_channel` takes the C kernel for the image `x`."""
    return (built() and _cpu_float(x) and _cpu_float(weight) and x.dim() == 4
            and not x.requires_grad and not torch.is_autocast_enabled("cpu"))  # fmt: skip


def _conv_in_c(conv: nn.Conv2d):
    """The module's forward: the C kernel where it applies, else the module's own (which
    nchw_input_gradients may have changed, for an image that needs a gradient)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not conv_runs_in_c(x, conv.weight):
            return nn.Conv2d.forward(conv, x)
        return _Conv5x5PerChannel.apply(x, conv.weight, conv.bias, _pair(conv.padding)[0])

    return forward


class _Conv5x5PerChannel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding: int):
        weight = weight.contiguous()
        n, g, h, w = x.shape
        o = weight.shape[0]
        y = torch.empty((n, o, h + 2 * padding - 4, w + 2 * padding - 4))
        _cpu_kernels.conv_forward(x.data_ptr(), x.stride(), weight.data_ptr(),
                                  0 if bias is None else bias.contiguous().data_ptr(),
                                  y.data_ptr(), n, g, h, w, o // g, padding, _threads())  # fmt: skip
        ctx.save_for_backward(x)
        ctx.weight_shape, ctx.has_bias, ctx.padding = weight.shape, bias is not None, padding
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        n, g, h, w = x.shape
        o = ctx.weight_shape[0]
        grad = grad.contiguous()
        grad_w = torch.empty(ctx.weight_shape)
        grad_b = torch.empty(o) if ctx.has_bias else None
        _cpu_kernels.conv_weight_grad(x.data_ptr(), x.stride(), grad.data_ptr(), grad_w.data_ptr(),
                                      0 if grad_b is None else grad_b.data_ptr(), n, g, h, w,
                                      o // g, ctx.padding, _threads())  # fmt: skip
        return None, grad_w, grad_b, None


# --- while training ---------------------------------------------------------------------------


@contextlib.contextmanager
def c_kernels(net: nn.Module):
    """While training on the CPU: the net's 2x2 average pools and 5x5 one-channel convolutions
    run the C kernels. Set on the modules for the duration and removed after, so the net pickles
    as a plain nn.Module (a logged model)."""
    patched = []
    if built():
        for module in net.modules():
            if is_pool2x2(module):
                module.forward = avg_pool2x2
            elif is_conv5x5_of_one_channel(module):
                module.forward = _conv_in_c(module)
            else:
                continue
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
