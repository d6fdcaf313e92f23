"""FusedOptimizer, member by member, against torch.optim: fed the same gradients, each member's
weights and optimizer state follow torch.optim's own on that member's net, in fp32, within the
tolerances named here (a (K,) lr tensor multiplies where torch.optim takes a scalar alpha)."""

import copy

import pytest
import torch
from torch import nn

from lenet_sweep.core.models import init_xavier, lenet
from lenet_sweep.fused.optim import FusedOptimizer

# After STEPS updates from the same gradients: SGD's and Adam's weights, and their buffers.
STEPS = 20
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

CASES = [
    (torch.optim.SGD, {}),
    (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
    (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"betas": (0.8, 0.99), "weight_decay": 1e-2}),
    (torch.optim.Adam, {"weight_decay": 1e-2, "decoupled_weight_decay": True}),
    (torch.optim.AdamW, {}),
    (torch.optim.AdamW, {"betas": (0.85, 0.995), "weight_decay": 0.05, "eps": 1e-6}),
]
LRS = {torch.optim.SGD: [0.9, 0.1, 0.03], torch.optim.Adam: [1e-3, 3e-3, 1e-2]}


def _members(cls, settings) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    lrs = LRS[torch.optim.SGD if cls is torch.optim.SGD else torch.optim.Adam]
    members = []
    for k, lr in enumerate(lrs):
        torch.manual_seed(k)
        net = lenet()
        net.apply(init_xavier)
        members.append((net, cls(net.parameters(), lr=lr, **settings)))
    return members


def _gradients(net: nn.Module, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    X, y = torch.rand(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(X), y).backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize(("cls", "settings"), CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_each_member_follows_torch_optim(cls, settings):
    members = _members(cls, settings)
    names = [name for name, _ in members[0][0].named_parameters()]
    stacked = {
        n: torch.stack([dict(net.named_parameters())[n].detach() for net, _ in members])
        for n in names
    }
    fused = FusedOptimizer.stack([opt for _, opt in members], stacked)
    for step in range(STEPS):
        grads = [_gradients(net, step) for net, _ in members]  # each member's own, from torch's
        for _, opt in members:
            opt.step()
        fused.step(stacked, {n: torch.stack([g[i] for g in grads]) for i, n in enumerate(names)})
    for k, (net, opt) in enumerate(members):
        for name, p in net.named_parameters():
            torch.testing.assert_close(stacked[name][k], p.detach(), **TOLERANCE)
        mirror = copy.deepcopy(opt)
        fused.unstack(k, mirror)  # what a checkpoint saves of the member
        for p, q in zip(
            opt.param_groups[0]["params"], mirror.param_groups[0]["params"], strict=True
        ):
            for key, value in opt.state[p].items():
                torch.testing.assert_close(mirror.state[q][key], value, **TOLERANCE)


def test_what_it_cannot_fuse_is_refused_with_the_fix():
    from lenet_sweep.errors import UserError

    net = lenet()
    params = {n: p.detach()[None] for n, p in net.named_parameters()}
    for opt in (
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5, dampening=0.1),
        torch.optim.Adam(net.parameters(), amsgrad=True),
        torch.optim.RMSprop(net.parameters()),
    ):
        with pytest.raises(UserError, match="use hydra/launcher=basic|supports torch.optim"):
            FusedOptimizer.stack([opt], params)
    sgd = [torch.optim.SGD(lenet().parameters(), lr=0.1, momentum=m) for m in (0.0, 0.9)]
    with pytest.raises(UserError, match="must share the optimizer and its settings but lr"):
        FusedOptimizer.stack(sgd, params)
