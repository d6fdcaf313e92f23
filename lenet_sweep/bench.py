"""`python -m lenet_sweep.bench`: this project's trainers against the seed's own path, on one
device, in one process, one table: outputs/bench/<device>.md and .json.

Rows: (a) the seed's path as d2l writes it (torchvision FashionMNIST + ToTensor + DataLoader with
4 workers, a host sync per batch), (b) the eager loop, (c) the CUDA-graph trainer (CUDA only),
(d) K trials fused (lenet_sweep.fused), (e) whole processes: `python -m lenet_sweep` for the
trial itself, a tiny run (start-up) and `--help`, and, on CPU, the seed's path as a process,
(f) the K-trial default sweep with `hydra/launcher=fused` (CUDA by default), its wall time split
into phases read off its log. Targets are ratios against row (a) of the same run, or wall times;
see the README's "Speed" section.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from lenet_sweep import OUTPUTS_DIR, PROJECT_ROOT, optim
from lenet_sweep.data import FILES, _decompressed, _find, load_splits
from lenet_sweep.models import init_xavier, lenet, place

LR, BATCH = 0.9, 256
SWEEP_TIMEOUT_S = 240


def _data_cfg():
    from omegaconf import OmegaConf

    from lenet_sweep import CONFIG_DIR

    return OmegaConf.load(CONFIG_DIR / "data" / "fashion_mnist.yaml")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _row(name, examples, train_s, wall_s, trials, test_acc, device, note="") -> dict:
    return {"row": name, "examples_per_s": examples / train_s, "s_per_trial": wall_s / trials,
            "test_acc": test_acc, "peak_mb": _peak_mb(device), "wall_s": wall_s, "note": note}  # fmt: skip


def _split_note(result, wall: float) -> str:
    """Where a trainer's wall time went: its steps, its evaluations, the rest (building the nets,
    warm-up and capture, host work between epochs)."""
    rest = wall - result.train_time_s - result.eval_time_s
    return (f"steps {result.train_time_s:.2f} s, evaluation {result.eval_time_s:.2f} s, "
            f"the rest {rest:.2f} s")  # fmt: skip


# --- (a) the seed's path -------------------------------------------------------------------------
def _torchvision_root(tmp: Path) -> Path:
    """The idx files where torchvision's FashionMNIST looks for them (raw/, decompressed)."""
    root, raw = Path(_data_cfg().system_root), tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES.values():
        (raw / name).symlink_to(_decompressed(_find(root, name), None)[0])
    return tmp


def seed_path(epochs: int, device: torch.device) -> dict:
    """train_ch6 as the book runs it: DataLoader batches, float() per batch, steps timed."""
    import torchvision
    from torch.utils import data
    from torchvision import transforms

    with tempfile.TemporaryDirectory() as tmp:
        root, to_tensor = str(_torchvision_root(Path(tmp))), transforms.ToTensor()
        train_set = torchvision.datasets.FashionMNIST(root, train=True, transform=to_tensor)
        test_set = torchvision.datasets.FashionMNIST(root, train=False, transform=to_tensor)
        train_iter = data.DataLoader(train_set, BATCH, shuffle=True, num_workers=4)
        test_iter = data.DataLoader(test_set, BATCH, shuffle=False, num_workers=4)
        _reset_peak(device)
        start = time.perf_counter()
        net = lenet()
        net.apply(init_xavier)
        net.to(device)
        optimizer, loss = torch.optim.SGD(net.parameters(), lr=LR), nn.CrossEntropyLoss()
        step_s, seen = 0.0, 0
        for _ in range(epochs):
            net.train()
            for X, y in train_iter:
                t = time.perf_counter()
                optimizer.zero_grad()
                X, y = X.to(device), y.to(device)
                y_hat = net(X)
                l = loss(y_hat, y)  # noqa: E741 - the book's name
                l.backward()
                optimizer.step()
                with torch.no_grad():  # d2l's Accumulator: a host sync per value
                    float(l * X.shape[0]), float((y_hat.argmax(1) == y).sum()), X.shape[0]
                step_s += time.perf_counter() - t
                seen += X.shape[0]
            net.eval()
            correct = 0
            with torch.no_grad():
                for X, y in test_iter:
                    correct += float((net(X.to(device)).argmax(1) == y.to(device)).sum())
        wall = time.perf_counter() - start
    return _row("(a) seed's path (DataLoader, 4 workers)", seen, step_s, wall, 1,
                correct / len(test_set), device, "steps timed as the book does")  # fmt: skip


# --- (b)-(d) this project's trainers -------------------------------------------------------------
def _splits(device):
    cfg = _data_cfg()
    return load_splits(cfg, device)


def _net(seed: int, device):
    torch.manual_seed(seed)
    net = lenet()
    net.apply(init_xavier)
    place(net, device)  # as models.build places a run's net and picks its optimizer
    return net, optim.SGD(net.parameters(), lr=LR)


def solo(name: str, epochs: int, device, graphed: bool, autocast=None) -> dict:
    from lenet_sweep.fused import train_graphed
    from lenet_sweep.train import train

    train_split, test_split = _splits(device)
    _reset_peak(device)
    start = time.perf_counter()
    net, optimizer = _net(42, device)
    trainer = train_graphed if graphed else train
    result = trainer(net, optimizer, train_split, test_split, epochs=epochs, batch_size=BATCH,
                     seed=42, progress=False, autocast=autocast)  # fmt: skip
    wall = time.perf_counter() - start
    return _row(name, result.examples_seen, result.train_time_s, wall, 1,
                result.final["test_acc"], device, _split_note(result, wall))  # fmt: skip


def fused(k: int, epochs: int, device, autocast=None) -> dict:
    from lenet_sweep.fused import Member, train_group

    train_split, test_split = _splits(device)
    _reset_peak(device)
    start = time.perf_counter()
    members = [Member(*_net(42 + i, device), epochs=epochs, seed=42 + i) for i in range(k)]
    train_group(members, train_split, test_split, batch_size=BATCH, graph=True, autocast=autocast)
    wall = time.perf_counter() - start
    accs = [m.result.final["test_acc"] for m in members]
    seen = sum(m.result.examples_seen for m in members)
    train_s = members[0].result.train_time_s  # the group's time: every member rode all of it
    note = f"test acc min {min(accs):.4f}; trial-examples/s" if k > 1 else "trial-examples/s"
    note += "; " + _split_note(members[0].result, wall)
    name = f"(d) fused K={k}" + (", bf16" if autocast else "")
    return _row(name, seen, train_s, wall, k, sum(accs) / k, device, note)


# --- (e) whole processes -------------------------------------------------------------------------
def _timed(args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)  # fmt: skip
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return time.perf_counter() - start, proc.returncode


def _make_stores(mlflow_uri: str, optuna_url: str | None = None) -> None:
    """The stores' tables (and the experiment), as a run or sweep before this one would have
    left them: making them is a one-off (1.4 s on 2 cores), not start-up."""
    from lenet_sweep import tracking_store

    tracking_store.prepare_experiment(mlflow_uri, "lenet_sweep")
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
    ratios (single pairs read 2.21-2.61x on one afternoon)."""
    pairs = [(_timed(ours[1]), _timed(seed[1])) for _ in range(repeats)]
    rows = [_e_row(ours[0], *_median([p[0] for p in pairs])),
            _e_row(seed[0], *_median([p[1] for p in pairs]))]  # fmt: skip
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
        common = [f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/run",
                  "progress=false"]  # fmt: skip
        tiny = ["-m", "lenet_sweep", *common, "data.train_size=256", "data.test_size=256",
                "epochs=1", "device=cpu"]  # fmt: skip
        run = ["-m", "lenet_sweep", *common, f"epochs={epochs}", f"device={device}"]
        _make_stores(f"sqlite:///{tmp}/mlflow.db")
        for name, args in [("(e) `--help`", ["-m", "lenet_sweep", "--help"]),
                           ("(e) tiny run: 256 examples, 1 epoch, CPU", tiny)]:  # fmt: skip
            rows.append(_e_row(name, *_median_timed(args, repeats)))
        name = f"(e) `python -m lenet_sweep lr=0.9 epochs={epochs}`"
        if not with_seed:
            rows.append(_e_row(name, *_median_timed(run, 1)))
        else:
            seed = ["-m", "lenet_sweep.bench", "--seed-process", f"--epochs={epochs}",
                    f"--device={device}"]  # fmt: skip
            seed_name = f"(e) the seed's path as a process, {epochs} epochs"
            rows += _paired((name, run), (seed_name, seed), repeats)
    return rows


def _e_row(name: str, wall: float, rc: int, note: str) -> dict:
    return {"row": name, "wall_s": wall, "note": note if rc == 0 else f"exit {rc}"}


# --- (f) a fused sweep ---------------------------------------------------------------------------
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
PHASES = [("start-up", r"Launching \d+ jobs"), ("preparing the jobs", r"trials as one group"),
          ("training + hooks + records", r"epoch \d+/\d+:"),
          ("ending the runs", r"sweep \S+: .* trial\(s\) run here")]  # fmt: skip


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


def sweep(k: int, device: str, out: Path, precision: str = "fp32",
          overrides: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """The K-trial default sweep, fused, as a process on new stores made beforehand (as for
    the other processes), `overrides` after the bench's own; its log kept in `out`."""
    name = f"(f) {k}-trial fused sweep" + (f", {precision}" if precision != "fp32" else "")
    log = out / f"sweep{k}-{precision}.log"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "lenet_sweep", "-m", "hydra/launcher=fused", f"hydra.sweeper.n_jobs={k}",
                f"hydra.sweeper.n_trials={k}", "progress=false", f"precision={precision}",
                f"device={device}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
                f"hydra.sweep.dir={tmp}/multirun", *overrides]  # fmt: skip
        _make_stores(f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db")
        start = time.time()
        with log.open("w") as f:
            try:  # a hung sweep costs its row, not the table
                rc = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT,
                                    cwd=PROJECT_ROOT, timeout=SWEEP_TIMEOUT_S).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = f"killed after {SWEEP_TIMEOUT_S} s"
        end = time.time()
    phases = sweep_phases(log.read_text().splitlines(), start, end)
    note = "; ".join(f"{p} {s:.1f}" for p, s in phases) + ("" if rc == 0 else f"; exit {rc}")
    return {"row": name, "wall_s": end - start, "note": note}


# --- the table -----------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict], device_name: str, seed_rate: float | None) -> str:
    lines = [f"# lenet_sweep bench on {device_name}", "",
             "| row | examples/s | × seed | s per trial | test acc | peak MB | wall s | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        rate = r.get("examples_per_s")
        ratio = rate / seed_rate if rate and seed_rate else None
        lines.append(f"| {r['row']} | {_fmt(rate, ',.0f')} | {_fmt(ratio, '.2f')} | "
                     f"{_fmt(r.get('s_per_trial'), '.2f')} | {_fmt(r.get('test_acc'), '.4f')} | "
                     f"{_fmt(r.get('peak_mb'), ',.0f')} | {_fmt(r.get('wall_s'), '.2f')} | "
                     f"{r.get('note', '')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _guarded(name: str, fn, *args) -> dict:
    """A row, or the row's error in its note: one broken row never hides the others."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"row": name, "note": f"failed: {type(e).__name__}: {e}"[:300]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m lenet_sweep.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--epochs", type=int, default=10 if default_device == "cuda" else 3)
    parser.add_argument("--fused", default="1,8,16,64" if default_device == "cuda" else "1,4",
                        help="group sizes K, comma-separated")  # fmt: skip
    parser.add_argument("--bf16", default="64" if default_device == "cuda" else "",
                        help="group sizes K also run with precision=bf16 (with a (c) row on CUDA)")  # fmt: skip
    parser.add_argument("--no-processes", action="store_true", help="skip the (e) rows")
    parser.add_argument("--repeats", type=int, default=3,
                        help="(e): `--help`, the tiny run and, on the CPU, the run and the seed's "
                             "process (alternated) timed as the median of this many")  # fmt: skip
    parser.add_argument("--sweep", default="64" if default_device == "cuda" else "",
                        help="(f) rows: K-trial fused sweeps, comma-separated (in --bf16 too: "
                             "also with precision=bf16)")  # fmt: skip
    parser.add_argument("--sweep-bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="the (f) sweeps of sizes in --bf16 also in bf16")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUTPUTS_DIR / "bench")
    parser.add_argument("--seed-process", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.seed_process:  # row (e)'s seed process: the seed's path alone
        print(seed_path(args.epochs, device))
        return
    rows: list[dict] = []
    for step in _plan(args, device):
        got = step()
        rows += got if isinstance(got, list) else [got]
        text, stem = _write(rows, args, argv, device)  # after every row: a timeout keeps them
    print(text)
    print(f"written: {stem}.md, {stem}.json")


def _plan(args, device) -> list:
    """The table's rows in order, each a call that returns its row (or the (e) rows)."""
    epochs, plan = args.epochs, []
    # (a) first: as the book runs, before our trainers raise malloc's thresholds (host_memory).
    plan.append(lambda: _guarded("(a) seed's path", seed_path, epochs, device))
    plan.append(lambda: _guarded("(b) eager loop", solo, "(b) eager loop", epochs, device, False))
    if device.type == "cuda":
        name = "(c) CUDA-graph trainer"
        plan.append(lambda: _guarded(name, solo, name, epochs, device, True))
        if args.bf16:
            plan.append(lambda: _guarded(f"{name}, bf16", solo, f"{name}, bf16", epochs, device,
                                         True, torch.bfloat16))  # fmt: skip
    for k in filter(None, args.fused.split(",")):
        plan.append(lambda k=k: _guarded(f"(d) fused K={k}", fused, int(k), epochs, device))
    for k in filter(None, args.bf16.split(",")):
        plan.append(lambda k=k: _guarded(f"(d) fused K={k}, bf16", fused, int(k), epochs, device,
                                         torch.bfloat16))  # fmt: skip
    if not args.no_processes:
        plan.append(lambda: processes(epochs, args.device, device.type == "cpu", args.repeats))
    bf16 = set(args.bf16.split(",")) if args.sweep_bf16 else set()
    for k in filter(None, args.sweep.split(",")):
        for precision in ["fp32", "bf16"] if k in bf16 else ["fp32"]:
            plan.append(lambda k=k, p=precision: _guarded(f"(f) {k}-trial fused sweep", sweep,
                                                          int(k), args.device, args.out, p))  # fmt: skip
    return plan


def _write(rows: list[dict], args, argv, device) -> tuple[str, Path]:
    name = device_name(device)
    text = table(rows, name, rows[0].get("examples_per_s"))
    text += f"\n{args.epochs} epochs per trial, lr {LR}, batch {BATCH}; torch {torch.__version__}; "
    text += (
        f"`python -m lenet_sweep.bench {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / name.replace(" ", "_").replace("/", "_")
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return text, stem


if __name__ == "__main__":
    main()
