"""The seed's LeNet, the Xavier init train_ch6 applies, and the configured net + optimizer."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lenet_sweep.optim import Optimizer, build_optimizer

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


def lenet(activation: str = "sigmoid", pool: str = "avg", num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 as in d2l: two conv blocks, three dense layers; 1x28x28 in, logits out."""
    act, pool_cls = ACTIVATIONS[activation], POOLS[pool]
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        act(),
        pool_cls(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        act(),
        pool_cls(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        act(),
        nn.Linear(120, 84),
        act(),
        nn.Linear(84, num_classes),
    )


def init_xavier(module: nn.Module) -> None:
    """train_ch6's init_weights: Xavier-uniform weights of every Linear and Conv2d, biases kept."""
    if type(module) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)


def build(cfg, device) -> tuple[nn.Module, Optimizer]:
    """The configured net, seeded and Xavier-initialised as train_ch6 does, and its optimizer
    (lenet_sweep.optim's where it covers the settings: same numbers, no torch._dynamo import)."""
    from hydra.utils import instantiate

    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model)
    net.apply(init_xavier)
    place(net, device)
    return net, build_optimizer(instantiate(cfg.optimizer), net.parameters())


def place(net: nn.Module, device) -> nn.Module:
    """Move a net to its device; on the CPU in channels-last layout: oneDNN's NHWC convolutions
    take 1.4x the steps per second there, with the same numbers."""
    net.to(device)
    if device.type == "cpu":
        net.to(memory_format=torch.channels_last)
    return net


@contextlib.contextmanager
def channels_last_gradients():
    """While training on the CPU: the gradient a Flatten hands back to a channels-last block
    (`place`) is made channels-last too. Flatten's backward returns it in plain NCHW order, so
    the pool's backward mixes layouts and the convolution's backward copies the gradient twice:
    0.5 ms of an 11 ms step on 2 cores, with bit-identical numbers. A process-wide hook for the
    duration, not one on the net: a net's own hooks are pickled with it (a logged model)."""

    def before_flatten(module, args):
        x = args[0] if args else None
        if (isinstance(module, nn.Flatten) and isinstance(x, torch.Tensor) and x.requires_grad
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
            x.register_hook(to_channels_last)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before_flatten)
    try:
        yield
    finally:
        handle.remove()


def to_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


# A vector of AVX-512 floats: fewer input channels fill part of it (nchw_input_gradients).
FEW_INPUT_CHANNELS = 16


@contextlib.contextmanager
def nchw_input_gradients(net: nn.Module):
    """While training on the CPU: the input gradient of each convolution with few input channels
    (LeNet's second: 6) is computed from NCHW copies, the rest of it as before. oneDNN computes a
    channels-last input gradient as a forward convolution whose output channels are those input
    channels, 6 of a vector's 16 lanes: 2.3 ms alone on 2 cores, 1.6 ms in NCHW order (a blocked
    kernel) plus 0.2 ms for the copies; a 10.4-10.8 ms step is 0.13-0.33 ms shorter (paired
    medians). Forward outputs and weight gradients are bit for bit the same; the input gradient
    differs in its last bits (another summation order). Set on the modules for the duration and
    removed after, so the net pickles as a plain nn.Module (a logged model)."""
    convs = [m for m in net.modules() if _takes_nchw_input_gradient(m)]
    for conv in convs:
        conv._conv_forward = _nchw_input_gradient_forward(conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv._conv_forward


def _takes_nchw_input_gradient(module: nn.Module) -> bool:
    # Grouped ones (a fused group's) are slower in NCHW: 13.6 against 7.0 ms for 4 members.
    return (type(module) is nn.Conv2d and module.in_channels < FEW_INPUT_CHANNELS
            and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))  # fmt: skip


def _nchw_input_gradient_forward(conv: nn.Conv2d):
    def conv_forward(x, weight, bias):
        # The net's input needs no gradient; under autocast the convolution's own casts apply.
        if not x.requires_grad or torch.is_autocast_enabled(x.device.type):
            return nn.Conv2d._conv_forward(conv, x, weight, bias)
        return _NchwInputGradient.apply(x, weight, bias, conv)

    return conv_forward


class _NchwInputGradient(torch.autograd.Function):
    """nn.Conv2d's own convolution forward; backward: the input gradient in NCHW order, handed
    back channels-last, the weight and bias gradients as autograd computes them."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Conv2d):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        conv, needs = ctx.conv, ctx.needs_input_grad
        geometry = (conv.stride, conv.padding, conv.dilation)
        grad_x = None
        if needs[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight.contiguous(), grad.contiguous(),
                                                *geometry, conv.groups)  # fmt: skip
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, *geometry,
            False, [0], conv.groups, [False, needs[1], needs[2]],
        )  # fmt: skip
        return grad_x, grad_weight, grad_bias, None
