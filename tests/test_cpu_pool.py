"""The CPU's 2x2 average pool in C (lenet_sweep/cpu_pool.py): torch's numbers, bit for bit."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lenet_sweep import cpu_pool
from lenet_sweep.models import init_xavier, lenet, place

CL = torch.channels_last


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (torch.equal calls -0.0 and 0.0 equal; these do not)."""
    return t.contiguous().view(torch.int32)


def test_the_kernel_is_built():
    assert cpu_pool.built(), (
        "lenet_sweep/_pool2x2.c was not built: install a C compiler with OpenMP (gcc) and run "
        "`pip install -e .` again"
    )


@pytest.mark.parametrize("shape", [(256, 6, 28, 28), (256, 16, 10, 10), (3, 24, 6, 4),
                                   (1, 1, 2, 2), (2, 5, 8, 14)])  # fmt: skip
def test_forward_and_backward_are_torchs_bit_for_bit(shape):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=CL)
    x[0, 0, :2, :2] = -0.0  # a window of -0.0: ATen's sum from 0 gives +0.0
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    grad[0, 0, 0, 0] = -0.0  # ATen's zeroed gradient plus -0.0 / 4 is +0.0
    grad = grad.contiguous(memory_format=CL)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = cpu_pool.avg_pool2x2(ours), F.avg_pool2d(theirs, 2, 2)
    assert out.grad_fn.name() == "_AvgPool2x2Backward"
    assert out.is_contiguous(memory_format=CL)
    assert torch.equal(bits(out), bits(expected))
    out.backward(grad)
    expected.backward(grad)
    assert ours.grad.is_contiguous(memory_format=CL)
    assert torch.equal(bits(ours.grad), bits(theirs.grad))


@pytest.mark.parametrize("why", ["nchw", "float64", "odd height"])
def test_other_inputs_take_torchs_pool(why):
    x = {"nchw": torch.randn(2, 6, 8, 8),
         "float64": torch.randn(2, 6, 8, 8, dtype=torch.float64).contiguous(memory_format=CL),
         "odd height": torch.randn(2, 6, 9, 8).contiguous(memory_format=CL)}[why]  # fmt: skip
    out = cpu_pool.avg_pool2x2(x.requires_grad_())
    assert out.grad_fn.name() != "_AvgPool2x2Backward"
    assert torch.equal(out, F.avg_pool2d(x, 2, 2))


def test_c_pools_takes_lenets_pools_only_while_it_lasts():
    """Both of LeNet's pools run in C inside the context, other pools as they were; after it the
    net is a plain one again (it pickles without the patch)."""
    net = nn.Sequential(lenet(), nn.AvgPool2d(3), nn.MaxPool2d(2), nn.AvgPool2d(2, ceil_mode=True))
    with cpu_pool.c_pools(net):
        patched = [m for m in net.modules() if "forward" in vars(m)]
        assert patched == [net[0][2], net[0][5]]
    assert not any("forward" in vars(m) for m in net.modules())
    assert type(pickle.loads(pickle.dumps(net))[0][2].forward).__name__ == "method"


def test_training_steps_are_the_same_bits_with_and_without_the_kernel(monkeypatch):
    """Ten SGD steps of LeNet as `train()` runs them on the CPU (channels-last), with the C pools
    and with torch's: every weight bit for bit."""
    from lenet_sweep.train import _cpu_kernels

    torch.manual_seed(0)
    first = place(lenet(), torch.device("cpu"))
    first.apply(init_xavier)
    second = copy.deepcopy(first)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def train_steps(net) -> str:
        with _cpu_kernels(net):
            pooled = net[:3](x.clone().requires_grad_()).grad_fn.name()
            for _ in range(10):
                net.zero_grad()
                F.cross_entropy(net(x), y).backward()
                with torch.no_grad():
                    for p in net.parameters():
                        p -= 0.9 * p.grad
        return pooled

    assert train_steps(first) == "_AvgPool2x2Backward"
    monkeypatch.setattr(cpu_pool, "_pool2x2", None)  # not built: torch's pool
    assert train_steps(second) == "AvgPool2DBackward0"
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
