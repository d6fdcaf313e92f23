"""lenet_sweep.optim against torch.optim: the same numbers bit for bit on the CPU, state_dicts
that load either way, torch's own class for settings ours does not cover, and no torch._dynamo."""

import copy
import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

from lenet_sweep import optim
from lenet_sweep.models import init_xavier, lenet, place

CASES = [
    (torch.optim.SGD, {"lr": 0.9}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.1}),
    (torch.optim.Adam, {"lr": 1e-3}),
    (torch.optim.Adam, {"lr": 1e-3, "betas": [0.8, 0.99], "weight_decay": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
    (torch.optim.AdamW, {"lr": 1e-3}),
]


def _net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = lenet()
    net.apply(init_xavier)
    return place(net, torch.device("cpu"))


def _steps(net, opt, n, seed=1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        X, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


@pytest.mark.parametrize(("cls", "settings"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_same_numbers_and_state_as_torch_optim(cls, settings):
    ours_net, torch_net = _net(), _net()
    ours = optim.build_optimizer(functools.partial(cls, **settings), ours_net.parameters())
    theirs = cls(torch_net.parameters(), **settings)
    assert type(ours) is optim.OURS[cls]
    _steps(ours_net, ours, 5)
    _steps(torch_net, theirs, 5)
    for p, q in zip(ours_net.parameters(), torch_net.parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_same_state(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize(("cls", "settings"), [CASES[1], CASES[5]], ids=["sgd", "adam"])
def test_state_dict_loads_either_way(cls, settings):
    """A checkpoint of either goes on in the other exactly as it would have gone on itself."""
    nets = [_net() for _ in range(4)]
    first = optim.OURS[cls](nets[0].parameters(), **settings)
    second = cls(nets[1].parameters(), **settings)
    _steps(nets[0], first, 3)
    _steps(nets[1], second, 3)
    for source, target in [(nets[0], nets[2]), (nets[1], nets[3])]:
        target.load_state_dict(source.state_dict())
    ours_from_torch = optim.OURS[cls](nets[3].parameters(), lr=123.0)
    ours_from_torch.load_state_dict(copy.deepcopy(second.state_dict()))  # as from a file
    torch_from_ours = cls(nets[2].parameters(), lr=123.0)
    torch_from_ours.load_state_dict(copy.deepcopy(first.state_dict()))
    for net, opt in [(nets[0], first), (nets[1], second), (nets[2], torch_from_ours),
                     (nets[3], ours_from_torch)]:  # fmt: skip
        _steps(net, opt, 2, seed=7)
    for p, q, r, s in zip(*(n.parameters() for n in nets), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r) and torch.equal(p, s)


def test_torch_builds_what_ours_does_not_cover():
    params = list(_net().parameters())
    for factory in [functools.partial(torch.optim.Adam, lr=1e-3, amsgrad=True),
                    functools.partial(torch.optim.SGD, lr=0.1, maximize=True),
                    functools.partial(torch.optim.RMSprop, lr=0.01)]:  # fmt: skip
        assert type(optim.build_optimizer(factory, params)) is factory.func
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentun'"):
        optim.build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentun=0.9), params)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        optim.build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, nesterov=True), params)


def test_a_run_step_does_not_import_dynamo():
    """Building and stepping the configured optimizer (each of conf/optimizer) and checkpointing it
    leaves torch._dynamo unimported: 1.2-1.5 s of start-up."""
    code = """
import sys
import torch
from hydra import compose, initialize_config_dir
from lenet_sweep import CONFIG_DIR, config
from lenet_sweep.models import build
config.register()
for choice in ("sgd", "adam"):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"optimizer={choice}"])
    net, opt = build(cfg, torch.device("cpu"))
    net(torch.zeros(2, 1, 28, 28)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
    print(type(opt).__module__, type(opt).__name__)
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["lenet_sweep.optim SGD", "lenet_sweep.optim Adam",
                                         "False"]  # fmt: skip


def test_step_takes_a_closure_as_torch_optim_does():
    net = _net()
    opt = optim.SGD(net.parameters(), lr=0.5)
    X, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X), y)
        loss.backward()
        return loss

    with torch.no_grad():
        before = nn.functional.cross_entropy(net(X), y).item()
    assert opt.step(closure).item() == pytest.approx(before)  # the loss before the update
    with torch.no_grad():
        assert nn.functional.cross_entropy(net(X), y).item() < before
