"""The seed's LeNet, the Xavier init train_ch6 applies, and a net with its optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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


def build(
    make_net: Callable[[], nn.Module],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    seed: int,
    device: torch.device,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A net seeded and Xavier-initialised as train_ch6 does, on `device`, and its optimizer
    (`make_optimizer(params)`: a torch.optim class with its settings)."""
    torch.manual_seed(seed)
    net = make_net()
    net.apply(init_xavier)
    net.to(device)
    return net, make_optimizer(net.parameters())
