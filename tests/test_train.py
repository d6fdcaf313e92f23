import math

import torch

from lenet_sweep.core.data import Splits, load_split
from lenet_sweep.core.state import TrainSpec
from lenet_sweep.core.train import train
from lenet_sweep.job.job import build_model as build


def _train(cfg, **kw):
    device = torch.device("cpu")
    splits = [load_split(cfg.data, train=t, device=device) for t in (True, False)]
    net, opt = build(cfg, device)
    kw = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, **kw}
    return train(net, opt, Splits(*splits), TrainSpec(progress=False, **kw))


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
    """speed.training on the CPU: the net channels-last, and the pool before the Flatten gets its
    gradient channels-last too, with the same numbers as a channels-last net without that hook
    (bit for bit); the net keeps no hook of it."""
    import pickle

    from lenet_sweep import speed

    cfg = make_cfg("epochs=1", "data.train_size=1024", "data.test_size=256")
    seen = []

    def spy(module, args):  # a Flatten's own pre-hook runs after the process-wide one
        if args[0].requires_grad:
            channels_last = torch.channels_last
            args[0].register_hook(
                lambda g: seen.append(g.is_contiguous(memory_format=channels_last))
            )

    device = torch.device("cpu")
    splits = [load_split(cfg.data, train=t, device=device) for t in (True, False)]
    net, opt = build(cfg, device)
    flatten = next(m for m in net if isinstance(m, torch.nn.Flatten))
    spy_handle = flatten.register_forward_pre_hook(spy)
    with speed.training([net], device):
        fixed = train(
            net, opt, Splits(*splits), TrainSpec(epochs=1, batch_size=256, seed=0, progress=False)
        )
    spy_handle.remove()
    assert seen and all(seen)
    assert net[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not flatten._forward_pre_hooks and pickle.loads(pickle.dumps(net)) is not None

    plain_net, plain_opt = build(cfg, device)
    plain_net.to(memory_format=torch.channels_last)
    plain = train(
        plain_net,
        plain_opt,
        Splits(*splits),
        TrainSpec(epochs=1, batch_size=256, seed=0, progress=False),
    )
    assert fixed.history == plain.history  # bit for bit


def test_speedups_turned_off_leave_the_net_as_built(make_cfg, monkeypatch):
    from lenet_sweep import speed

    monkeypatch.setenv(speed.ENV, "none")
    cfg = make_cfg("epochs=1", "data.train_size=256", "data.test_size=256")
    net, _ = build(cfg, torch.device("cpu"))
    with speed.training([net], torch.device("cpu")):
        assert not net[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not speed.keep_freed_memory.__wrapped__()
    monkeypatch.setenv(speed.ENV, "fast_exit,host_memory")
    assert speed.enabled("host_memory") and not speed.enabled("channels_last")


def test_a_run_steps_torch_optims_own_optimizers(make_cfg):
    for choice, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)):
        net, opt = build(make_cfg(f"optimizer={choice}", "lr=0.01"), torch.device("cpu"))
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01
        assert opt.param_groups[0]["params"] == list(net.parameters())
