"""Rows (e) and (f): whole processes (`python -m lenet_sweep`, start-up, the seed's path as a
process) and a fused sweep with its wall time split into phases read off its log."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from lenet_sweep import PROJECT_ROOT

SWEEP_TIMEOUT_S = 240


# --- (e) whole processes -------------------------------------------------------------------------
def _timed(args: list[str], env: dict | None = None) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=PROJECT_ROOT, env=env
    )
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return time.perf_counter() - start, proc.returncode


def _make_stores(mlflow_uri: str, optuna_url: str | None = None) -> None:
    """The stores' tables (and the experiment), as a run or sweep before this one would have
    left them: making them is a one-off, not start-up."""
    from lenet_sweep.tracking import backend

    backend.prepare_experiment(mlflow_uri, "lenet_sweep")
    if optuna_url:
        import optuna

        optuna.storages.RDBStorage(optuna_url)


def _median_timed(args: list[str], repeats: int) -> tuple[float, int, str]:
    """The median wall time of `repeats` runs (a shared machine's noise shows as outliers)."""
    return _median([_timed(args) for _ in range(repeats)])


def _median(runs: list[tuple[float, int]]) -> tuple[float, int, str]:
    """(median wall time, the first failure's exit status or 0, a note with min and max)."""
    walls = sorted(wall for wall, _ in runs)
    note = (
        f"median of {len(walls)} (min {walls[0]:.2f}, max {walls[-1]:.2f})"
        if len(walls) > 1
        else ""
    )
    return walls[len(walls) // 2], next((code for _, code in runs if code), 0), note


def _paired(ours: tuple[str, list[str]], seed: tuple[str, list[str]], repeats: int) -> list[dict]:
    """Our process and the seed's, alternated `repeats` times so that the shared machine's slow
    spells fall on both: each row is its median, and our row's note the median of the pairs'
    ratios."""
    pairs = [(_timed(ours[1]), _timed(seed[1])) for _ in range(repeats)]
    rows = [
        _e_row(ours[0], *_median([p[0] for p in pairs])),
        _e_row(seed[0], *_median([p[1] for p in pairs])),
    ]
    if all(code == 0 for pair in pairs for _, code in pair):
        ratios = sorted(seed_run[0] / our_run[0] for our_run, seed_run in pairs)
        spread = f" (min {ratios[0]:.2f}, max {ratios[-1]:.2f})" if repeats > 1 else ""
        rows[0]["note"] += f"; {ratios[len(ratios) // 2]:.2f}x the seed's process{spread}"
    return rows


def processes(epochs: int, device: str, with_seed: bool, repeats: int = 3) -> list[dict]:
    """The (e) rows: start-up (`--help`, the tiny run) as the median of `repeats` runs; on the
    CPU the run and the seed's process alternated `repeats` times (`_paired`)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"hydra.run.dir={tmp}/run",
            "progress=false",
        ]
        tiny = [
            "-m",
            "lenet_sweep",
            *common,
            "data.train_size=256",
            "data.test_size=256",
            "epochs=1",
            "device=cpu",
        ]
        run = ["-m", "lenet_sweep", *common, f"epochs={epochs}", f"device={device}"]
        _make_stores(f"sqlite:///{tmp}/mlflow.db")
        for name, args in [
            ("(e) `--help`", ["-m", "lenet_sweep", "--help"]),
            ("(e) tiny run: 256 examples, 1 epoch, CPU", tiny),
        ]:
            rows.append(_e_row(name, *_median_timed(args, repeats)))
        name = f"(e) `python -m lenet_sweep lr=0.9 epochs={epochs}`"
        if not with_seed:
            rows.append(_e_row(name, *_median_timed(run, 1)))
        else:
            seed = ["-m", "bench", "--seed-process", f"--epochs={epochs}", f"--device={device}"]
            seed_name = f"(e) the seed's path as a process, {epochs} epochs"
            rows += _paired((name, run), (seed_name, seed), repeats)
    return rows


def _e_row(name: str, wall: float, rc: int, note: str) -> dict:
    return {"row": name, "wall_s": wall, "note": note if rc == 0 else f"exit {rc}"}


# --- (f) a fused sweep ---------------------------------------------------------------------------
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
OCCUPANCY = re.compile(r"fused slots: \d+ of \d+ slot-epochs trained a live trial \((\d+) %")
PHASES = [
    ("start-up", r"trial \d+ started"),
    ("preparing the jobs", r"trials as one group"),
    ("training + hooks + records", r"epoch \d+/\d+:"),
    ("ending the runs", r"sweep \S+: .* trial\(s\) run here"),
]


def sweep_phases(lines: list[str], start: float, end: float) -> list[tuple[str, float]]:
    """(phase, seconds) of a sweep whose process ran from `start` to `end` (epoch seconds), read
    off its log's timestamps: each phase ends at its mark's first line (training: the last epoch
    line); `closing` runs from the last mark to the end (results, the parent run's plots)."""
    found = {}
    for line in lines:
        if not (m := STAMP.match(line)):
            continue
        t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for name, pattern in PHASES:
            if re.search(pattern, line) and (name not in found or name.startswith("training")):
                found[name] = t
    out, previous = [], start
    for name, _ in PHASES:
        if name in found:
            out.append((name, found[name] - previous))
            previous = found[name]
    return [*out, ("closing", end - previous)]


def sweep(
    k: int,
    device: str,
    out: Path,
    precision: str = "fp32",
    overrides: tuple[str, ...] = (),
    n: int | None = None,
    name: str | None = None,
) -> dict:
    """The default sweep of n trials (K by default) in K fused slots, as a process on new
    stores made beforehand (as for the other processes), `overrides` after the bench's own;
    its log kept in `out`."""
    n = n or k
    name = name or f"(f) {k}-trial fused sweep" + (f", {precision}" if precision != "fp32" else "")
    log = (
        out / f"{re.sub(r'[^0-9a-z]+', '-', name).strip('-')}.log"
    )  # (f) 64-trial... f-64-trial...
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "-m",
            "lenet_sweep",
            "-m",
            "hydra/launcher=fused",
            f"hydra.sweeper.n_jobs={k}",
            f"hydra.sweeper.n_trials={n}",
            "progress=false",
            f"precision={precision}",
            f"device={device}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
            f"hydra.sweep.dir={tmp}/multirun",
            *overrides,
        ]
        _make_stores(f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db")
        start = time.time()
        with log.open("w") as f:
            try:  # a hung sweep costs its row, not the table
                rc = subprocess.run(
                    [sys.executable, *args],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    cwd=PROJECT_ROOT,
                    timeout=SWEEP_TIMEOUT_S,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = f"killed after {SWEEP_TIMEOUT_S} s"
        end = time.time()
    lines = log.read_text().splitlines()
    phases = sweep_phases(lines, start, end)
    note = "; ".join(f"{p} {s:.1f}" for p, s in phases) + ("" if rc == 0 else f"; exit {rc}")
    busy = [m[1] for line in lines if (m := OCCUPANCY.search(line))]
    trials_per_min = 60 * n / (end - start)
    note += f"; {trials_per_min:.1f} trials/min" + (f", slots {busy[-1]} % busy" if busy else "")
    return {"row": name, "wall_s": end - start, "note": note, "trials_per_min": trials_per_min}


# On the CPU the (h) sweeps train on a slice of the data: minutes, not hours.
CPU_REFILL_DATA = ("data.train_size=2048", "data.test_size=512")


def refill_rows(k: int, n: int, device: str, out: Path) -> list[dict]:
    """(h) the default sweep of n > K trials in K slots: Hydra's batches (the next K once all
    have ended) against refill (a freed slot takes the next trial at the next boundary)."""
    data = CPU_REFILL_DATA if device == "cpu" else ()
    head = f"(h) {n} trials in {k} slots" + (", 2,048 examples" if data else "")
    rows = []
    for how, setting in (("batches", "true"), ("refill", "false")):
        overrides = (f"hydra.sweeper.batches={setting}", *data)
        rows.append(sweep(k, device, out, overrides=overrides, n=n, name=f"{head}, {how}"))
    batches, refill = (r["trials_per_min"] for r in rows)
    rows[1]["note"] += f"; {refill / batches:.2f}x the batches' trials/min"
    return rows
