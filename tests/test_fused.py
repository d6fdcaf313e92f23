"""Fused trials on CPU: the engine against runs alone, and `hydra/launcher=fused` end to end,
read back from Optuna, MLflow and the job dirs."""

from __future__ import annotations

import logging
import math
import re
import signal

import pytest
import torch
from optuna.trial import TrialState

from lenet_sweep import signals
from lenet_sweep.core.checkpoint import Checkpoint
from lenet_sweep.core.data import Splits, load_split, load_splits
from lenet_sweep.core.hooks import Diverged, save_checkpoint, stop_on_divergence
from lenet_sweep.core.state import StepSpec, TrainSpec
from lenet_sweep.core.train import train
from lenet_sweep.fused import epoch, trainer
from lenet_sweep.fused.epoch import Epoch
from lenet_sweep.fused.group import Group
from lenet_sweep.fused.trainer import Member, train_group
from lenet_sweep.job.job import build_model as build
from lenet_sweep.tracking import backend as tracking_backend
from tests.conftest import PRUNED_AND_COMPLETE, model_of, train_refilled

CPU = torch.device("cpu")
FUSED = ["hydra/launcher=fused", "hydra.sweeper.n_jobs=4", "hydra.sweeper.n_trials=4"]


@pytest.fixture
def trial(make_cfg):
    """A trial's config, net and optimizer as a run alone builds them, and the shared data."""
    cfg = make_cfg()
    splits = load_split(cfg.data, True, CPU), load_split(cfg.data, False, CPU)

    def _trial(lr: float, seed: int):
        cfg = make_cfg(f"lr={lr}", f"seed={seed}")
        return cfg, *build(cfg, CPU)

    return _trial, splits


def test_each_member_follows_its_run_alone(trial):
    make, splits = trial
    splits = (*splits, load_splits(make(0.9, 1)[0].data, CPU, 256).val)  # a sweep's validation
    specs = [(0.9, 1, 2), (0.3, 2, 3), (0.05, 3, 1)]  # lr, seed, epochs: each its own
    members, alone = [], []
    for lr, seed, epochs in specs:
        _, net, optimizer = make(lr, seed)
        members.append(Member(net, optimizer, epochs=epochs, seed=seed))
        _, net, optimizer = make(lr, seed)
        alone.append(
            train(
                net,
                optimizer,
                Splits(*splits),
                TrainSpec(epochs=epochs, batch_size=256, seed=seed, progress=False),
            )
        )
    train_group(
        members, Splits(*splits), StepSpec(batch_size=256, graph=True)
    )  # graph: ignored on CPU
    for member, solo in zip(members, alone, strict=True):
        fused = member.result.history
        assert [h["epoch"] for h in fused] == [h["epoch"] for h in solo.history]
        assert math.isclose(fused[0]["train_loss"], solo.history[0]["train_loss"], rel_tol=1e-4)
        assert abs(fused[-1]["test_acc"] - solo.final["test_acc"]) <= 0.02
        assert abs(fused[-1]["val_acc"] - solo.final["val_acc"]) <= 0.02  # the same bounds
        assert math.isclose(fused[0]["val_loss"], solo.history[0]["val_loss"], rel_tol=1e-3)
    # Each member's own net holds its own weights, as a run alone leaves them.
    weights = [m.net[0].weight for m in members]
    assert not torch.equal(weights[0], weights[1])


@pytest.mark.slow
def test_bf16_members_follow_their_bf16_runs_alone(trial):
    make, splits = trial
    members, alone = [], []
    for lr, seed in [(0.9, 1), (0.3, 2)]:
        _, net, optimizer = make(lr, seed)
        members.append(Member(net, optimizer, epochs=2, seed=seed))
        _, net, optimizer = make(lr, seed)
        alone.append(
            train(
                net,
                optimizer,
                Splits(*splits),
                TrainSpec(
                    epochs=2, batch_size=256, seed=seed, progress=False, autocast=torch.bfloat16
                ),
            )
        )
    train_group(
        members, Splits(*splits), StepSpec(batch_size=256, graph=False, autocast=torch.bfloat16)
    )
    for member, solo in zip(members, alone, strict=True):
        fused = member.result.history
        assert math.isclose(fused[0]["train_loss"], solo.history[0]["train_loss"], rel_tol=1e-3)
        assert abs(fused[-1]["test_acc"] - solo.final["test_acc"]) <= 0.02


def test_a_diverging_member_fails_alone(trial):
    make, splits = trial
    members = []
    for lr, seed in [(0.5, 1), (500.0, 2), (0.5, 3)]:
        _, net, optimizer = make(lr, seed)
        members.append(
            Member(net, optimizer, epochs=2, seed=seed, hooks=[stop_on_divergence(23.0)])
        )
    train_group(members, Splits(*splits), StepSpec(batch_size=256, graph=False))
    assert isinstance(members[1].error, Diverged) and len(members[1].result.history) == 1
    assert [m.error for m in (members[0], members[2])] == [None, None]
    assert [len(m.result.history) for m in (members[0], members[2])] == [2, 2]


def test_a_member_is_handed_over_as_it_leaves_while_the_others_train(trial):
    make, splits = trial
    members = []
    for lr, seed, epochs in [(0.9, 1, 1), (0.5, 2, 3)]:
        _, net, optimizer = make(lr, seed)
        members.append(Member(net, optimizer, epochs=epochs, seed=seed))
    left = []

    def on_leave(member):  # what the other member had done by then, and the leaver's weights
        left.append((member, len(members[1].result.history), member.net[0].weight.clone()))

    train_refilled(members, Splits(*splits), StepSpec(batch_size=256), on_leave=on_leave)
    assert [(id(m), seen) for m, seen, _ in left] == [(id(members[0]), 1), (id(members[1]), 3)]
    # The leaver's net holds its own final weights, untouched by the epochs trained after it.
    assert torch.equal(left[0][2], members[0].net[0].weight)
    _, net, optimizer = make(0.9, 1)
    train(
        net, optimizer, Splits(*splits), TrainSpec(epochs=1, batch_size=256, seed=1, progress=False)
    )
    assert torch.allclose(members[0].net[0].weight, net[0].weight, atol=1e-5)


def test_a_stop_request_launches_no_further_epoch(trial, tmp_path, monkeypatch, caplog):
    """SIGTERM during epoch 1 of 3: epoch 1's hooks run (its checkpoint is written), epoch 2 is
    never launched, and the group stops with Terminated."""
    make, splits = trial
    assert signals._requested == []  # every earlier stop request was cleared as it was handled
    launches = []
    launch = Epoch.launch
    monkeypatch.setattr(Epoch, "launch", lambda self: launches.append(1) or launch(self))

    class SignalAfterEpochOne(logging.Handler):  # the signal lands as epoch 1 is read back
        def emit(self, record):
            if "epoch 1/3" in record.getMessage():
                signals._handler(signal.SIGTERM, None)

    logging.getLogger("lenet_sweep.core.train").addHandler(handler := SignalAfterEpochOne())
    _, net, optimizer = make(0.9, 5)
    path = tmp_path / "checkpoint.pt"
    try:
        member = Member(net, optimizer, 3, 5, [save_checkpoint(path)])
        # stop_on_signals: as the fused launcher trains a group
        with (
            caplog.at_level(logging.INFO),
            pytest.raises(signals.Terminated),
            signals.stop_on_signals(),
        ):
            train_group([member], Splits(*splits), StepSpec(batch_size=256, graph=False))
    finally:
        logging.getLogger("lenet_sweep.core.train").removeHandler(handler)
    assert len(launches) == 1
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert signals._requested == []  # handled: the next run or sweep starts afresh


@pytest.mark.slow
def test_a_resumed_member_ends_where_the_uninterrupted_one_does(trial, tmp_path):
    make, splits = trial
    _, net, optimizer = make(0.9, 5)
    whole = Member(net, optimizer, epochs=3, seed=5)
    train_group([whole], Splits(*splits), StepSpec(batch_size=256, graph=False))

    def stop_after_one(state):
        if state.epoch == 1:
            raise KeyboardInterrupt

    path = tmp_path / "checkpoint.pt"
    _, net, optimizer = make(0.9, 5)
    hooks = [save_checkpoint(path), stop_after_one]
    with pytest.raises(KeyboardInterrupt):
        train_group(
            [Member(net, optimizer, 3, 5, hooks)],
            Splits(*splits),
            StepSpec(batch_size=256, graph=False),
        )
    checkpoint = Checkpoint(**torch.load(path, weights_only=True))
    _, net, optimizer = make(0.9, 5)
    resumed = Member(net, optimizer, 3, 5, resume=checkpoint)
    train_group([resumed], Splits(*splits), StepSpec(batch_size=256, graph=False))
    assert resumed.result.history == whole.result.history


@pytest.mark.slow
def test_fused_sweep_records_every_trial_as_if_run_alone(sweep):
    proc = sweep.run(
        *FUSED,
        "hydra/sweeper/sampler=grid",
        "lr=choice(0.2, 0.5, 0.9, 500.0)",
        "epochs=choice(1, 2)",
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.n_jobs=8",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sweep.trials()
    states = {(t.params["lr"], t.params["epochs"]): t.state for t in trials}
    assert states[(500.0, 1)] == states[(500.0, 2)] == TrialState.FAIL  # diverged: alone
    assert (
        "diverged at epoch 1"
        in trials[[t.params["lr"] for t in trials].index(500.0)].user_attrs["fail_reason"]
    )
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 6
    parents, children = sweep.runs()
    assert len(parents) == 1 and len(children) == 8
    client = tracking_backend.client(sweep.mlflow_uri)
    groups = {r.data.tags["lenet_sweep.fused_group"].split()[0] for r in children}
    assert len(groups) == 1  # one batch, one group
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        t = trials[number]
        history = client.get_metric_history(run.info.run_id, "val_acc")  # the objective
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert [m.step for m in history] == list(range(1, t.params["epochs"] + 1))
            assert history[-1].value == t.value  # Optuna's value is the child's last epoch
            assert float(run.data.params["lr"]) == t.params["lr"]
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"config.yaml", "training_curves.png"} <= names
            assert "MLmodel" in model_of(client, run)[1]
            assert (sweep.dir / str(number) / "checkpoint.pt").is_file()
        else:
            assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
        assert (sweep.dir / str(number) / ".hydra" / "config.yaml").is_file()
    # The log: each trial's start and end once; the group's rate once, no trial's own.
    out = proc.stdout
    assert re.search(
        r"\] group of 8 trials in 8 slots: [\d,]+ examples/sec on cpu, slots 69 % busy\n", out
    )
    # Epoch 1: 8 live in 8 slots. Epoch 2: the 2-epoch trials but lr=500, which diverged in
    # epoch 1: 3 live in 8 slots (the group compacted to 4). 11 of 16.
    assert "] fused slots: 11 of 16 slot-epochs trained a live trial (69 %" in out
    assert parents[0].data.metrics["slot_occupancy"] == pytest.approx(11 / 16)
    assert out.count("examples/sec") == 1 and out.count("mlflow ui ") == 1
    for t in trials:
        assert out.count(f"] trial {t.number} started: lr=") == 1
        end = "done: val_acc=" if t.state == TrialState.COMPLETE else "failed: "
        assert out.count(f"] trial {t.number} {end}") == 1


@pytest.mark.slow
def test_fused_sweep_prunes_a_member_alone(sweep):
    proc = sweep.run(
        *FUSED,
        *PRUNED_AND_COMPLETE,
        "epochs=3",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = {t.params["lr"]: t.state for t in sweep.trials()}
    assert states == {0.003: TrialState.COMPLETE, 1e-07: TrialState.PRUNED}
    _, children = sweep.runs()
    by_state = {r.data.tags["optuna.trial_state"]: r for r in children}
    assert by_state["PRUNED"].data.tags["pruned_at_epoch"] == "1"
    assert by_state["PRUNED"].info.status == "FINISHED"
    assert by_state["COMPLETE"].data.metrics["epochs_run"] == 3


@pytest.mark.slow
def test_fused_sweep_killed_then_rerun_finishes_the_total(sweep):
    # The group has trained an epoch: kill it mid-training.
    pid = sweep.killed_when(
        lambda trials: trials and all(t.intermediate_values for t in trials),
        *FUSED,
        "epochs=5",
        "lr=interval(0.1, 1.0)",
    )
    assert [t.state for t in sweep.trials()] == [TrialState.RUNNING] * 4

    rerun = sweep.run(*FUSED, "epochs=5", "lr=interval(0.1, 1.0)")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 4 + [TrialState.COMPLETE] * 4
    _, children = sweep.runs()
    statuses = sorted((int(r.data.tags["optuna.trial_number"]), r.info.status) for r in children)
    assert statuses == [(i, "KILLED") for i in range(4)] + [(i, "FINISHED") for i in range(4, 8)]
    why = f"worker died: pid {pid} on "
    assert all(t.user_attrs["fail_reason"].startswith(why) for t in trials[:4])
    killed = [r for r in children if r.info.status == "KILLED"]
    assert all(r.data.tags["error"].startswith(why) for r in killed)


@pytest.mark.parametrize(("activation", "pool"), [("sigmoid", "avg"), ("relu", "max")])
def test_the_written_out_step_is_the_vmapped_one(activation, pool):
    from torch.func import functional_call, grad_and_value, vmap

    from lenet_sweep.core.models import lenet
    from lenet_sweep.fused.epoch import _step_functions

    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(lenet(activation, pool))
    params = {
        name: torch.stack([dict(n.named_parameters())[name].detach() for n in nets])
        for name, _ in nets[0].named_parameters()
    }
    template = nets[0].to("meta")
    step, logits = _step_functions(template)
    assert type(step).__name__ == "StackedStep"

    def loss_and_logits(p, X, y):
        out = functional_call(template, p, (X,))
        return torch.nn.functional.cross_entropy(out, y), out

    X, y = torch.randn(3, 8, 1, 28, 28), torch.randint(0, 10, (3, 8))
    grads, (loss, out) = step(params, X, y)
    v_grads, (v_loss, v_out) = vmap(grad_and_value(loss_and_logits, has_aux=True))(params, X, y)
    assert torch.allclose(loss, v_loss, atol=1e-6) and torch.allclose(out, v_out, atol=1e-5)
    for name in params:
        assert torch.allclose(grads[name], v_grads[name], rtol=1e-4, atol=1e-6), name
    shared = torch.randn(5, 1, 28, 28)  # the evaluation: one batch for every member
    v_logits = vmap(lambda p, X: functional_call(template, p, (X,)), in_dims=(0, None))
    assert torch.allclose(logits(params, shared), v_logits(params, shared), atol=1e-5)


def test_the_written_out_steps_channels_last_gradient_changes_no_number(monkeypatch):
    """On the CPU the Flatten's gradient goes back channels-last (faster); the same bits."""
    from lenet_sweep.core.models import lenet
    from lenet_sweep.fused import stacked
    from lenet_sweep.fused.epoch import _step_functions

    torch.manual_seed(0)
    nets = [lenet() for _ in range(2)]
    params = {
        name: torch.stack([dict(n.named_parameters())[name].detach() for n in nets])
        for name, _ in nets[0].named_parameters()
    }
    step, _ = _step_functions(nets[0].to("meta"))
    X, y = torch.randn(2, 16, 1, 28, 28), torch.randint(0, 10, (2, 16))
    seen = []
    fixed = step(params, X, y)[0]
    monkeypatch.setattr(
        stacked.speed, "to_channels_last", lambda g: seen.append(g.is_contiguous()) or g
    )
    plain = step(params, X, y)[0]
    assert seen == [True]  # left alone, the gradient comes back in NCHW order
    assert all(torch.equal(fixed[name], plain[name]) for name in params)


def test_one_members_first_convolution_is_the_eager_nets():
    """A member's first convolution is the eager net's channels-last one, bit for bit: one
    member's input has a single channel, which says no layout, so the weights say it (as a
    net's do in speed.training), or oneDNN ran the member's first block NCHW, slower."""
    from lenet_sweep.core.models import lenet
    from lenet_sweep.fused.stacked import _conv, grouped_input

    torch.manual_seed(0)
    net = lenet().to(memory_format=torch.channels_last)
    params = {name: p.detach().unsqueeze(0) for name, p in net.named_parameters()}
    x = grouped_input(torch.randn(1, 8, 1, 28, 28), 1)
    out = _conv("0", net[0])(params, x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, net[0](x))  # the eager net's first convolution, bit for bit


@pytest.mark.parametrize(
    ("n", "batch", "plan"),
    [
        (60000, 256, [(16, 256, 14), (1, 256, 10), (1, 96, 1)]),  # the seed's epoch: 235 steps
        (16 * 32, 32, [(16, 32, 1)]),  # whole chunks only
        (256, 256, [(1, 256, 1)]),  # one full batch
        (100, 256, [(1, 100, 1)]),  # a split smaller than a batch
    ],
)
def test_an_epochs_graphs_cover_every_example_once(n, batch, plan):
    assert epoch.STEPS_PER_GRAPH == 16
    assert epoch.replay_plan(n, batch) == plan
    assert sum(steps * b * times for steps, b, times in plan) == n


@pytest.mark.slow
def test_the_graphs_cursor_steps_walk_the_epochs_batches(trial):
    """On CUDA an epoch is a few graphs (16 steps, one step, the odd last batch) that read their
    batches through a cursor on the device; walked eagerly here, they must leave every weight,
    optimizer state and sum exactly as the eager epoch does."""
    make, (train_split, test_split) = trial
    n, batch = 8 * (2 * epoch.STEPS_PER_GRAPH + 3) + 5, 8  # two chunks, three singles, odd last
    assert epoch.replay_plan(n, batch) == [(epoch.STEPS_PER_GRAPH, 8, 2), (1, 8, 3), (1, 5, 1)]
    train_split = type(train_split)(train_split.images[:n], train_split.labels[:n])
    epochs = []
    for _ in range(2):
        members = [
            Member(*make(lr, seed)[1:], epochs=1, seed=seed) for lr, seed in [(0.9, 1), (0.1, 2)]
        ]
        group = Group.stack(trainer.start_members(members, CPU), n, CPU)
        group.perm.copy_(
            torch.stack(
                [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
            )
        )
        epochs.append(Epoch(group, Splits(train_split, test_split), StepSpec(batch_size=batch)))
    epochs[0]._train_steps()
    for steps, b, times in epoch.replay_plan(n, batch):
        for _ in range(times):
            epochs[1]._cursor_steps(steps, b)
    assert epochs[1].cursor.item() == n
    eager, graphs = (e.group.state_tensors() for e in epochs)
    assert all(torch.equal(x, y) for x, y in zip(eager, graphs, strict=True))
    eager_sums, graph_sums = (e.group.sums for e in epochs)
    assert all(torch.equal(eager_sums[k], graph_sums[k]) for k in eager_sums)


class _TwoLayer(torch.nn.Module):  # not a Sequential: the fused trainer vmaps it
    def __init__(self):
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(784, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def test_any_other_net_trains_fused_through_vmap(trial):
    _, splits = trial
    members, alone = [], []
    for seed in (1, 2):
        for out in (members, alone):
            torch.manual_seed(seed)
            net = _TwoLayer()
            out.append((net, torch.optim.SGD(net.parameters(), lr=0.1)))
    members = [
        Member(net, opt, epochs=2, seed=s) for (net, opt), s in zip(members, (1, 2), strict=True)
    ]
    train_group(members, Splits(*splits), StepSpec(batch_size=256, graph=False))
    for member, (net, opt), seed in zip(members, alone, (1, 2), strict=True):
        solo = train(
            net,
            opt,
            Splits(*splits),
            TrainSpec(epochs=2, batch_size=256, seed=seed, progress=False),
        )
        fused = member.result.history[0]["train_loss"]
        assert math.isclose(fused, solo.history[0]["train_loss"], rel_tol=1e-4)


def test_each_trial_config_is_what_hydra_composes():
    """The launcher composes once per set of group choices and applies each trial's values:
    the configs must equal Hydra's own load_sweep_config, hydra node included."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from lenet_sweep import CONFIG_DIR
    from lenet_sweep.job.compose import Composer

    env = "++hydra.job.env_set.LENET_SWEEP_TRIAL"  # as the sweeper sets it
    trials = [
        ["lr=0.1", "epochs=3", "trial.number=0", "trial.name='t000 lr=0.1 ep=3'", f"{env}=0"],
        ["lr=2.5", "epochs=7", "trial.number=1", "trial.name='t001 lr=2.5 ep=7'", f"{env}=1"],
        ["optimizer=adam", "lr=0.01", "epochs=2", "trial.number=2", "progress=false"],
        ["optimizer=adam", "lr=0.02", "epochs=4", "trial.number=3", "progress=false"],
        ["lr=0.3", "epochs=1", "trial.number=4", "trial.name='t004 lr=0.3 ep=1'", f"{env}=4"],
        ["lr=0.3", "trial.number=5", "+extra=1"],
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "config",
            ["hydra/launcher=fused", "hydra.sweeper.n_jobs=4", "progress=false"],
            RunMode.MULTIRUN,
        )
        compose = Composer(loader, master)
        for overrides in trials:
            expected = loader.load_sweep_config(master, overrides)
            got = compose(overrides)
            assert OmegaConf.to_container(got) == OmegaConf.to_container(expected), overrides
        assert len(compose.composed) == 3  # sgd + 5 values, adam + 4 values, +extra
