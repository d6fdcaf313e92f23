import contextlib
import math

import torch

from lenet_sweep.data import load_split
from lenet_sweep.models import build
from lenet_sweep.train import train


def _train(cfg, **kw):
    device = torch.device("cpu")
    splits = [load_split(cfg.data, train=t, device=device) for t in (True, False)]
    net, opt = build(cfg, device)
    kw = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, **kw}
    return train(net, opt, *splits, progress=False, **kw)


def test_training_learns_and_metrics_are_sample_weighted(make_cfg):
    cfg = make_cfg(
        "model=lenet_relu",
        "optimizer=adam",
        "lr=0.003",
        "epochs=2",
        "data.train_size=4000",
        "batch_size=300",
    )
    result = _train(cfg)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final["test_acc"] > 0.6
    # 4000 = 13 full batches of 300 + one of 100: accuracy is a multiple of 1/4000
    assert abs(result.final["train_acc"] * 4000 - round(result.final["train_acc"] * 4000)) < 1e-6
    assert result.examples_seen == 8000 and result.train_time_s > 0


def test_fixed_seed_gives_identical_metrics_on_cpu(make_cfg):
    cfg = make_cfg("epochs=2", "data.train_size=1024", "data.test_size=256")
    first, second = _train(cfg), _train(cfg)
    assert first.history == second.history
    other = _train(make_cfg("epochs=2", "data.train_size=1024", "data.test_size=256", "seed=7"))
    assert other.history != first.history


def test_hooks_see_every_epoch(make_cfg):
    seen = []
    _train(make_cfg("epochs=3", "data.train_size=512"), hooks=[lambda s: seen.append(s.epoch)])
    assert seen == [1, 2, 3]


def test_bf16_autocast_learns_as_fp32_does(make_cfg):
    """precision=bf16: the steps under autocast, the weights and the sums still fp32."""
    cfg = make_cfg("epochs=2", "data.train_size=4000", "data.test_size=1000", "lr=0.5")
    fp32, bf16 = _train(cfg), _train(cfg, autocast=torch.bfloat16)
    assert bf16.history != fp32.history  # it did run in bf16
    assert abs(bf16.final["test_acc"] - fp32.final["test_acc"]) <= 0.03
    assert math.isclose(bf16.history[0]["train_loss"], fp32.history[0]["train_loss"], rel_tol=0.01)


def test_cpu_training_hands_channels_last_gradients_back_through_flatten(make_cfg):
    """The same numbers as without the layout fix (bit for bit); the pool before the Flatten
    gets its gradient channels-last while training; the net keeps no hook of it."""
    import pickle

    from lenet_sweep import train as train_module

    cfg = make_cfg("epochs=1", "data.train_size=1024", "data.test_size=256")
    seen = []

    def spy(module, args):  # a Flatten's own pre-hook runs after the process-wide one
        if args[0].requires_grad:
            args[0].register_hook(lambda g: seen.append(g.is_contiguous(
                memory_format=torch.channels_last)))  # fmt: skip

    device = torch.device("cpu")
    splits = [load_split(cfg.data, train=t, device=device) for t in (True, False)]
    net, opt = build(cfg, device)
    flatten = next(m for m in net if isinstance(m, torch.nn.Flatten))
    spy_handle = flatten.register_forward_pre_hook(spy)
    fixed = train(net, opt, *splits, epochs=1, batch_size=256, seed=0, progress=False)
    spy_handle.remove()
    assert seen and all(seen)
    assert not flatten._forward_pre_hooks and pickle.loads(pickle.dumps(net)) is not None

    original = train_module.channels_last_gradients
    train_module.channels_last_gradients = contextlib.nullcontext
    try:
        plain = _train(cfg, epochs=1, batch_size=256, seed=0)
    finally:
        train_module.channels_last_gradients = original
    assert fixed.history == plain.history  # bit for bit
