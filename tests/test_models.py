import torch
from torch import nn

from lenet_sweep.models import init_xavier, lenet


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


def test_nchw_input_gradients_change_only_the_last_bits_of_input_gradients():
    """While training on the CPU the second convolution's input gradient comes from NCHW copies:
    the forward and every gradient after it bit for bit, the first convolution's (fed by that
    input gradient) within rounding; afterwards the net is a plain one again."""
    import copy
    import pickle

    from lenet_sweep.models import channels_last_gradients, nchw_input_gradients, place

    torch.manual_seed(0)
    plain = place(lenet(), torch.device("cpu"))
    plain.apply(init_xavier)
    nchw = copy.deepcopy(plain)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    with channels_last_gradients():
        out = plain(x)
        nn.functional.cross_entropy(out, y).backward()
        with nchw_input_gradients(nchw):
            out_nchw = nchw(x)
            second = nchw[3](torch.rand(2, 6, 14, 14, requires_grad=True))
            assert second.grad_fn.name() == "_NchwInputGradientBackward"
            nn.functional.cross_entropy(out_nchw, y).backward()
    assert torch.equal(out, out_nchw)
    grads = {name: p.grad for name, p in plain.named_parameters()}
    for name, p in nchw.named_parameters():
        if name.startswith("0."):  # behind the second convolution's input gradient
            assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-7), name
            assert not torch.equal(p.grad, grads[name]), name  # it did take the NCHW path
        else:
            assert torch.equal(p.grad, grads[name]), name
    assert not any("_conv_forward" in vars(m) for m in nchw.modules())
    loaded = pickle.loads(pickle.dumps(nchw))
    assert loaded[3]._conv_forward.__func__ is nn.Conv2d._conv_forward
