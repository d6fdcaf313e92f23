"""LeNet's first block on the CPU in C (lenet_sweep/cpu_kernels.py): the pools are torch's numbers
bit for bit, the convolution float64's within float32 rounding, and both the same every run."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lenet_sweep import cpu_kernels
from lenet_sweep.models import init_xavier, lenet, place

CL = torch.channels_last


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (torch.equal calls -0.0 and 0.0 equal; these do not)."""
    return t.contiguous().view(torch.int32)


def test_the_kernels_are_built():
    assert cpu_kernels.built(), (
        "lenet_sweep/_cpu_kernels.c was not built: install a C compiler with OpenMP (gcc) and "
        "run `pip install -e .` again"
    )


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("shape", [(256, 6, 28, 28), (256, 16, 10, 10), (3, 24, 6, 4),
                                   (1, 1, 2, 2), (2, 5, 8, 14)])  # fmt: skip
def test_pool_forward_and_backward_are_torchs_bit_for_bit(shape, layout):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=layout)
    x[0, 0, :2, :2] = -0.0  # a window of -0.0: ATen's sum from 0 gives +0.0
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    grad[0, 0, 0, 0] = -0.0  # ATen's zeroed gradient plus -0.0 / 4 is +0.0
    grad = grad.contiguous(memory_format=CL)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = cpu_kernels.avg_pool2x2(ours), F.avg_pool2d(theirs, 2, 2)
    assert out.grad_fn.name() == "_AvgPool2x2Backward"
    assert out.is_contiguous(memory_format=CL)  # what the second convolution reads
    assert torch.equal(bits(out), bits(expected))
    out.backward(grad)
    expected.backward(grad)
    assert ours.grad.stride() == x.stride()  # in the input's layout
    assert torch.equal(bits(ours.grad), bits(theirs.grad))


@pytest.mark.parametrize("why", ["float64", "odd height", "a strided view"])
def test_other_inputs_take_torchs_pool(why):
    x = {"float64": torch.randn(2, 6, 8, 8, dtype=torch.float64),
         "odd height": torch.randn(2, 6, 9, 8),
         "a strided view": torch.randn(2, 6, 8, 16)[..., ::2]}[why]  # fmt: skip
    out = cpu_kernels.avg_pool2x2(x.requires_grad_())
    assert out.grad_fn.name() != "_AvgPool2x2Backward"
    assert torch.equal(out, F.avg_pool2d(x, 2, 2))


@pytest.mark.parametrize("n, groups, o, h, w, padding", [(256, 1, 6, 28, 28, 2), (7, 1, 3, 9, 13, 0),
                                                         (5, 1, 16, 17, 30, 3),
                                                         (6, 4, 24, 28, 28, 2)])  # fmt: skip
def test_conv_is_exact_within_rounding_and_the_same_every_time(n, groups, o, h, w, padding):
    """One image channel (LeNet's first convolution) or one per group (a fused group's, its
    input channels-last): float64's numbers within float32 rounding, the same bits each time."""
    torch.manual_seed(0)
    conv = nn.Conv2d(groups, o, 5, padding=padding, groups=groups)
    x = torch.rand(n, groups, h, w).contiguous(memory_format=CL)
    grad_out = torch.randn(n, o, h + 2 * padding - 4, w + 2 * padding - 4)

    def forward(x):
        return cpu_kernels.conv5x5_per_channel(x, conv.weight, conv.bias, padding)

    outs, grads = [], []
    for _ in range(2):
        conv.zero_grad()
        out = forward(x)
        assert out.grad_fn.name() == "_Conv5x5PerChannelBackward"
        out.backward(grad_out)
        outs.append(out)
        grads.append([conv.weight.grad.clone(), conv.bias.grad.clone()])
    exact = copy.deepcopy(conv).double()  # float64: both float32 sums round, oneDNN's more
    expected = exact(x.double())
    expected.backward(grad_out.double())
    pairs = [(outs[0], expected), *zip(grads[0], [exact.weight.grad, exact.bias.grad], strict=True)]
    for ours, truth in pairs:
        assert (ours.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    assert torch.equal(bits(outs[0]), bits(outs[1]))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(*grads, strict=True))


def test_a_conv_whose_input_needs_a_gradient_is_torchs():
    conv = nn.Conv2d(1, 6, 5, padding=2)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    out = cpu_kernels._conv_in_c(conv)(x)
    assert out.grad_fn.name() == "ConvolutionBackward0"
    assert torch.equal(out, conv(x))


def test_c_kernels_take_lenets_first_block_only_while_they_last():
    """LeNet's first convolution and both pools run in C inside the context, other modules as
    they were; after it the net is a plain one again (it pickles without the patch)."""
    net = nn.Sequential(lenet(), nn.AvgPool2d(3), nn.MaxPool2d(2), nn.AvgPool2d(2, ceil_mode=True),
                        nn.Conv2d(1, 6, 3), nn.Conv2d(2, 6, 5))  # fmt: skip
    with cpu_kernels.c_kernels(net):
        patched = [m for m in net.modules() if "forward" in vars(m)]
        assert patched == [net[0][0], net[0][2], net[0][5]]
    assert not any("forward" in vars(m) for m in net.modules())
    assert type(pickle.loads(pickle.dumps(net))[0][2].forward).__name__ == "method"


def test_training_steps_with_the_kernels_are_torchs_within_rounding_and_repeat(monkeypatch):
    """Ten SGD steps of LeNet as `train()` runs them on the CPU: with the kernels, twice, the
    same bits; against torch's kernels, within rounding."""
    from lenet_sweep.train import _cpu_kernels

    torch.manual_seed(0)
    start = place(lenet(), torch.device("cpu"))
    start.apply(init_xavier)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def trained() -> tuple[nn.Module, list[str]]:
        net = copy.deepcopy(start)
        with _cpu_kernels(net):
            first_block = [net[0](x).grad_fn.name(), net[:3](x).grad_fn.name()]
            for _ in range(10):
                net.zero_grad()
                F.cross_entropy(net(x), y).backward()
                with torch.no_grad():
                    for p in net.parameters():
                        p -= 0.9 * p.grad
        return net, first_block

    (ours, ran), (again, _) = trained(), trained()
    assert ran == ["_Conv5x5PerChannelBackward", "_AvgPool2x2Backward"]
    monkeypatch.setattr(cpu_kernels, "_cpu_kernels", None)  # not built: torch's kernels
    theirs, ran = trained()
    assert ran == ["ConvolutionBackward0", "AvgPool2DBackward0"]
    for (name, a), b, c in zip(ours.named_parameters(), again.parameters(), theirs.parameters(),
                               strict=True):  # fmt: skip
        assert torch.equal(bits(a), bits(b)), name
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6), name
