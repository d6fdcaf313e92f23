"""bench's parts that need no timing: the sweep log's phases, the (f) row, the
table written as the rows come."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from bench import sweep, sweep_phases


def test_sweep_phases_splits_a_sweep_log_at_its_marks():
    def at(s: str) -> float:
        return datetime.strptime(f"2026-11-26 08:00:{s}", "%Y-%m-%d %H:%M:%S,%f").timestamp()

    lines = [
        "[2026-11-26 08:00:02,000] MLflow: mlflow ui ...",
        "[2026-11-26 08:00:05,000] trial 0 started: lr=0.1 epochs=2",
        "[2026-11-26 08:00:05,000] trial 1 started: lr=0.2 epochs=20",
        "[2026-11-26 08:00:12,500] training 64 trials as one group on cuda:0",
        "[2026-11-26 08:00:13,000] t000 lr=0.1 ep=2: epoch 1/2: train loss 2.3",
        "[2026-11-26 08:00:40,000] t001 lr=0.2 ep=20: epoch 20/20: train loss 0.4",
        "[2026-11-26 08:00:41,000] group of 64 trials: 250,000 examples/sec on cuda:0",
        "[2026-11-26 08:00:42,000] sweep lenet_sweep: 64 complete; 64 trial(s) run here in 37s",
    ]
    phases = sweep_phases(lines, at("01,000"), at("45,000"))
    assert [(name, round(s, 3)) for name, s in phases] == [
        ("start-up", 4.0),
        ("preparing the jobs", 7.5),
        ("training + hooks + records", 27.5),
        ("ending the runs", 2.0),
        ("closing", 3.0),
    ]


def test_sweep_phases_of_a_sweep_that_never_launched():
    phases = sweep_phases(["[2026-11-26 08:00:03,000] error: lr=abc"], 100.0, 104.5)
    assert phases == [("closing", 4.5)]


@pytest.mark.slow
def test_the_sweep_row_runs_a_fused_sweep_and_splits_its_wall_time(tmp_path):
    tiny = ("data.train_size=64", "data.test_size=64", "batch_size=32", "epochs=range(1,3)")
    row = sweep(3, "cpu", tmp_path, overrides=tiny)
    assert row["row"] == "(f) 3-trial fused sweep"
    *parts, rates = row["note"].split("; ")
    assert re.fullmatch(r"[\d.]+ trials/min, slots \d+ % busy", rates), rates
    phases = [part.rsplit(" ", 1) for part in parts]
    assert [name for name, _ in phases] == [
        "start-up",
        "preparing the jobs",
        "training + hooks + records",
        "ending the runs",
        "closing",
    ]
    assert abs(sum(float(s) for _, s in phases) - row["wall_s"]) < 0.3  # they fill it
    log = (tmp_path / "f-3-trial-fused-sweep.log").read_text()
    assert "training 3 trials as one group on cpu" in log and "3 complete" in log


def test_the_table_is_written_after_every_row(tmp_path, monkeypatch):
    """A bench cut short (the device call's time limit) leaves the rows it finished."""
    import json

    import bench
    from bench import cli

    def cut_short():
        raise KeyboardInterrupt  # what the time limit's signal amounts to

    first = {"row": "(a) seed's path", "examples_per_s": 1000.0, "wall_s": 1.5}
    monkeypatch.setattr(cli, "_plan", lambda args, device: [lambda: first, cut_short])
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device=cpu", f"--out={tmp_path}"])
    (md,) = tmp_path.glob("*.md")
    assert "| (a) seed's path | 1,000 | 1.00 |" in md.read_text()
    assert json.loads(md.with_suffix(".json").read_text())["rows"] == [first]


def test_the_bf16_sweep_rows_can_be_left_out(monkeypatch):
    """scripts/device-check's bench fits the device call: its 64-trial sweep in fp32 only."""
    import torch

    from bench import cli as bench

    made = []
    for name in ("seed_path", "solo", "fused", "sweep"):
        monkeypatch.setattr(bench, name, lambda *a, name=name: made.append((name, *a[-1:])) or {})
    for extra, sweeps in [([], ["fp32", "bf16"]), (["--no-sweep-bf16"], ["fp32"])]:
        made.clear()
        args = bench.parse_args(
            [
                "--device=cpu",
                "--fused=",
                "--bf16=2",
                "--sweep=2",
                "--refill=",
                "--no-processes",
                *extra,
            ]
        )
        for step in bench._plan(args, torch.device("cpu")):
            step()
        assert [m[-1] for m in made if m[0] == "sweep"] == sweeps
        assert ("fused", torch.bfloat16) in made  # the (d) bf16 row stays either way


def test_start_up_rows_are_the_median_of_repeated_runs():
    from bench import processes as bench

    wall, rc, note = bench._median_timed(["-c", "pass"], 3)
    low, high = (
        float(x) for x in note.removeprefix("median of 3 (min ").rstrip(")").split(", max ")
    )
    assert rc == 0 and low <= round(wall, 2) <= high
    assert bench._median_timed(["-c", "raise SystemExit(3)"], 1)[1:] == (3, "")


def test_the_cpu_run_and_the_seed_process_are_timed_in_alternated_pairs(monkeypatch):
    from bench import processes as bench

    calls, timed = [], bench._timed
    ours, seed = ["-c", "pass"], ["-c", "import time; time.sleep(0.4)"]
    monkeypatch.setattr(bench, "_timed", lambda args: calls.append(args) or timed(args))
    run_row, seed_row = bench._paired(("run", ours), ("seed", seed), 3)
    assert calls == [ours, seed] * 3  # alternated, not three of one then three of the other
    assert seed_row["wall_s"] > run_row["wall_s"] and seed_row["note"].startswith("median of 3")
    ratio, spread = run_row["note"].split("; ")[1].split("x the seed's process ")
    low, high = (float(x) for x in spread.removeprefix("(min ").rstrip(")").split(", max "))
    assert 1 < low <= float(ratio) <= high


def test_a_failed_process_in_the_pairs_shows_and_no_ratio_is_claimed():
    from bench import processes as bench

    run_row, seed_row = bench._paired(
        ("run", ["-c", "pass"]), ("seed", ["-c", "raise SystemExit(3)"]), 1
    )
    assert seed_row["note"] == "exit 3" and run_row["note"] == ""


def test_a_speed_setting_is_timed_on_against_off_in_pairs():
    from bench.speedups import _row

    # exits 0 only where the environment says what the row compares: all on, or all but one
    check = (
        "import os, sys; sys.exit(0 if os.environ['LENET_SWEEP_SPEEDUPS'] in "
        "('all', 'startup_gc,host_memory,channels_last') else 5)"
    )
    row = _row("fast_exit", ["-c", check], 2)
    assert row["note"].startswith("median of 2") and "paired median" in row["note"], row
    assert _row("startup_gc", ["-c", check], 1)["note"] == "exit 5"  # it ran with the wrong set


def test_the_refill_rows_run_batches_then_refill_and_compare_them(monkeypatch, tmp_path):
    from bench import processes

    made = []

    def fake_sweep(k, device, out, overrides=(), n=None, name=None):
        made.append((k, n, overrides, name))
        return {
            "row": name,
            "note": "x",
            "trials_per_min": 10.0 if "batches=true" in overrides[0] else 16.0,
        }

    monkeypatch.setattr(processes, "sweep", fake_sweep)
    rows = processes.refill_rows(4, 16, "cpu", tmp_path)
    data = ("data.train_size=2048", "data.test_size=512")
    assert made == [
        (
            4,
            16,
            ("hydra.sweeper.batches=true", *data),
            "(h) 16 trials in 4 slots, 2,048 examples, batches",
        ),
        (
            4,
            16,
            ("hydra.sweeper.batches=false", *data),
            "(h) 16 trials in 4 slots, 2,048 examples, refill",
        ),
    ]
    assert rows[1]["note"] == "x; 1.60x the batches' trials/min" and rows[0]["note"] == "x"
