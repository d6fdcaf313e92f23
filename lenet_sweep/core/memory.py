"""What training a group of members costs in memory, known before it trains: refused with one
line when it cannot fit (a thousand seeds of one run had filled 20 GB and met the OOM killer,
leaving its runs and trial RUNNING)."""

from __future__ import annotations

import torch
from torch import nn

from lenet_sweep.errors import UserError

# Autograd keeps each layer's output for the backward, which makes a gradient as large, and the
# step's temporaries about as much again: three times the forward's activations.
KEPT = 3


def activations_per_example(net: nn.Module, shape=(1, 28, 28)) -> int:
    """Floats a forward pass of one example produces, over every leaf module's output."""
    total = [0]

    def count(module, args, output) -> None:
        if isinstance(output, torch.Tensor) and not list(module.children()):
            total[0] += output.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules()]
    try:
        with torch.no_grad():
            net.to("cpu")(torch.zeros(1, *shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0] + int(torch.tensor(shape).prod())


def group_bytes(net: nn.Module, members: int, batch_size: int, examples: int) -> int:
    """A group of `members` nets training on batches of `batch_size`, with `examples` images on
    the device: the activations, each member's weights, gradients and two optimizer buffers."""
    params = sum(p.numel() for p in net.parameters())
    per_member = KEPT * activations_per_example(net) * batch_size + 4 * params
    return 4 * (members * per_member + examples * 28 * 28)


def available(device: torch.device) -> int | None:
    """Bytes free for training on `device` (the CPU: MemAvailable); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(net, members: int, batch_size: int, examples: int, device, what: str) -> None:
    """Refuse, with one line naming `what` (the setting) and the limit, a group that cannot
    fit on `device`."""
    need, free = group_bytes(net, members, batch_size, examples), available(device)
    if free is not None and need > free:
        gib = 2**30
        raise UserError(
            f"{what}: {members} members of batch {batch_size} need about {need / gib:.1f} GiB, "
            f"more than the {free / gib:.1f} GiB free on {device}; lower it (or batch_size)"
        )


def check_config(cfg, build, device, members: int, what: str) -> None:
    """`check_fits` for a run's config (`build(cfg, cpu)`: its net and optimizer)."""
    examples = cfg.data.train_size or cfg.data.num_train
    net, _ = build(cfg, torch.device("cpu"))
    check_fits(net, members, cfg.batch_size, examples, device, what)
