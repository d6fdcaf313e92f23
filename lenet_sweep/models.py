"""The seed's LeNet, the Xavier init train_ch6 applies, and the configured net + optimizer."""

import contextlib

import torch
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
