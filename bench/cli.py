"""`python -m bench`: this project's trainers against the seed's own path, on one device, in
one process, one table: outputs/bench/<device>.md and .json.

Rows: (a) the seed's path as d2l writes it (torchvision FashionMNIST + ToTensor + DataLoader with
4 workers, a host sync per batch), (b) the eager loop, (c) the CUDA-graph trainer (CUDA only),
(d) K trials fused (lenet_sweep.fused), (e) whole processes: `python -m lenet_sweep` for the
trial itself, a tiny run (start-up) and `--help`, and, on CPU, the seed's path as a process,
(f) the K-trial default sweep with `hydra/launcher=fused` (CUDA by default), its wall time split
into phases read off its log, its trials per minute and how busy its slots were, (g) with
--speedups, what each process-level speed setting buys, (h) the default sweep of N > K trials
in K fused slots, Hydra's batches against refill: wall time, trials per minute, slots busy.
Targets are ratios against row (a) of the same run, or wall times; docs/performance.md holds the
current tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from bench.processes import processes, refill_rows, sweep
from bench.speedups import speedup_rows
from bench.trainers import BATCH, LR, fused, seed_path, solo
from lenet_sweep import OUTPUTS_DIR


# --- the table -----------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict], device_name: str, seed_rate: float | None) -> str:
    lines = [
        f"# lenet_sweep bench on {device_name}",
        "",
        "| row | examples/s | × seed | s per trial | test acc | peak MB | wall s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rate = r.get("examples_per_s")
        ratio = rate / seed_rate if rate and seed_rate else None
        lines.append(
            f"| {r['row']} | {_fmt(rate, ',.0f')} | {_fmt(ratio, '.2f')} | "
            f"{_fmt(r.get('s_per_trial'), '.2f')} | {_fmt(r.get('test_acc'), '.4f')} | "
            f"{_fmt(r.get('peak_mb'), ',.0f')} | {_fmt(r.get('wall_s'), '.2f')} | "
            f"{r.get('note', '')} |"
        )
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
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--epochs", type=int, default=10 if default_device == "cuda" else 3)
    parser.add_argument(
        "--fused",
        default="1,8,16,64" if default_device == "cuda" else "1,4",
        help="group sizes K, comma-separated",
    )
    parser.add_argument(
        "--bf16",
        default="64" if default_device == "cuda" else "",
        help="group sizes K also run with precision=bf16 (with a (c) row on CUDA)",
    )
    parser.add_argument("--no-processes", action="store_true", help="skip the (e) rows")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="(e): `--help`, the tiny run and, on the CPU, the run and the seed's "
        "process (alternated) timed as the median of this many",
    )
    parser.add_argument(
        "--sweep",
        default="64" if default_device == "cuda" else "",
        help="(f) rows: K-trial fused sweeps, comma-separated (in --bf16 too: "
        "also with precision=bf16)",
    )
    parser.add_argument(
        "--sweep-bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the (f) sweeps of sizes in --bf16 also in bf16",
    )
    parser.add_argument(
        "--refill",
        default="64:256" if default_device == "cuda" else "4:16",
        help="(h) rows: K:N, N trials of the default search in K slots, batches and refill "
        "(comma-separated; empty: none)",
    )
    parser.add_argument(
        "--speedups",
        action="store_true",
        help="(g) rows: each of lenet_sweep.speed's settings on against off (--repeats pairs)",
    )
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

    def add(name: str, fn, *fn_args) -> None:
        plan.append(lambda: _guarded(name, fn, *fn_args))

    # (a) first: as the book runs, before our trainers raise malloc's thresholds (speed).
    add("(a) seed's path", seed_path, epochs, device)
    add("(b) eager loop", solo, "(b) eager loop", epochs, device, False)
    graph = "(c) CUDA-graph trainer"
    if device.type == "cuda":
        add(graph, solo, graph, epochs, device, True)
    if device.type == "cuda" and args.bf16:
        add(f"{graph}, bf16", solo, f"{graph}, bf16", epochs, device, True, torch.bfloat16)
    for k in filter(None, args.fused.split(",")):
        add(f"(d) fused K={k}", fused, int(k), epochs, device)
    for k in filter(None, args.bf16.split(",")):
        add(f"(d) fused K={k}, bf16", fused, int(k), epochs, device, torch.bfloat16)
    if not args.no_processes:
        plan.append(lambda: processes(epochs, args.device, device.type == "cpu", args.repeats))
    if args.speedups:
        plan.append(lambda: speedup_rows(args.repeats))
    bf16 = set(args.bf16.split(",")) if args.sweep_bf16 else set()
    for k in filter(None, args.sweep.split(",")):
        for precision in ["fp32", "bf16"] if k in bf16 else ["fp32"]:
            add(f"(f) {k}-trial fused sweep", sweep, int(k), args.device, args.out, precision)
    for pair in filter(None, args.refill.split(",")):
        k, n = (int(x) for x in pair.split(":"))
        add(f"(h) {n} trials in {k} slots", refill_rows, k, n, args.device, args.out)
    return plan


def _write(rows: list[dict], args, argv, device) -> tuple[str, Path]:
    name = device_name(device)
    text = table(rows, name, rows[0].get("examples_per_s"))
    text += f"\n{args.epochs} epochs per trial, lr {LR}, batch {BATCH}; torch {torch.__version__}; "
    text += f"`python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / name.replace(" ", "_").replace("/", "_")
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return text, stem
