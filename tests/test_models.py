import torch
from torch import nn

from lenet_sweep.core.models import init_xavier, lenet


def test_lenet_is_the_seed_net():
    net = lenet()
    kinds = [type(m).__name__ for m in net]
    assert kinds == [
        "Conv2d",
        "Sigmoid",
        "AvgPool2d",
        "Conv2d",
        "Sigmoid",
        "AvgPool2d",
        "Flatten",
        "Linear",
        "Sigmoid",
        "Linear",
        "Sigmoid",
        "Linear",
    ]
    assert (net[0].in_channels, net[0].out_channels, net[0].kernel_size, net[0].padding) == (
        1,
        6,
        (5, 5),
        (2, 2),
    )
    assert (net[3].in_channels, net[3].out_channels, net[3].padding) == (6, 16, (0, 0))
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [
        (400, 120),
        (120, 84),
        (84, 10),
    ]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_lenet_relu_has_same_shape_with_relu_and_maxpool():
    net = lenet("relu", "max")
    assert sum(isinstance(m, nn.ReLU) for m in net) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in net) == 2
    assert not any(isinstance(m, nn.Sigmoid | nn.AvgPool2d) for m in net)


def test_xavier_uniform_applied_to_weights_only():
    torch.manual_seed(0)
    net = lenet()
    biases = [m.bias.detach().clone() for m in net if isinstance(m, nn.Linear | nn.Conv2d)]
    net.apply(init_xavier)
    layers = [m for m in net if isinstance(m, nn.Linear | nn.Conv2d)]
    for layer, bias in zip(layers, biases, strict=True):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        # uniform on [-b, b] has std b/sqrt(3); PyTorch's default init is much narrower here
        assert abs(w.std().item() - bound / 3**0.5) < 0.15 * bound
        assert torch.equal(layer.bias.detach(), bias)
