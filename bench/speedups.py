"""Rows (g): what each process-level speed setting (lenet_sweep.speed) buys, on the path it is
for: the command line with all settings on against all but that one, alternated in pairs so
that the shared machine's slow spells fall on both; the note gives the median paired saving."""

from __future__ import annotations

import os
import tempfile

from bench.processes import _make_stores, _median, _timed
from lenet_sweep import speed

# What each setting is measured on: a tiny run (start-up and exit), a one-epoch run (the CPU's
# steps) and a one-epoch fused sweep of 4 trials (a CPU group's steps); "{}" marks a fresh study.
TINY = ["data.train_size=256", "data.test_size=256", "epochs=1", "device=cpu"]
EPOCH = ["epochs=1", "device=cpu"]
FUSED = ["-m", "hydra/launcher=fused", "hydra.sweeper.n_jobs=4", "hydra.sweeper.n_trials=4",
         "epochs=1", "device=cpu", "hydra.sweeper.study_name=speedups-{}"]  # fmt: skip
ON = {
    "startup_gc": ("tiny run", TINY),
    "fast_exit": ("tiny run", TINY),
    "channels_last": ("1 epoch, CPU", EPOCH),
    "host_memory": ("4 trials fused, 1 epoch, CPU", FUSED),
}


def speedup_rows(repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _make_stores(f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db")
        common = [f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "progress=false",
                  f"hydra.run.dir={tmp}/run", f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
                  f"hydra.sweep.dir={tmp}/multirun/{{}}"]  # fmt: skip
        for name, (what, args) in ON.items():
            row = _row(name, ["-m", "lenet_sweep", *args, *common], repeats)
            rows.append({**row, "row": f"(g) {name} ({what})"})
    return rows


def _row(name: str, args: list[str], repeats: int) -> dict:
    """`args` with every setting on against all but `name`, alternated `repeats` times."""
    others = ",".join(n for n in speed.NAMES if n != name)
    on, off = {**os.environ, speed.ENV: "all"}, {**os.environ, speed.ENV: others}

    def timed(label: str, env: dict) -> tuple[float, int]:
        return _timed([a.replace("{}", f"{name}-{label}") for a in args], env)

    pairs = [(timed(f"on{i}", on), timed(f"off{i}", off)) for i in range(repeats)]
    wall_on, rc_on, note = _median([p[0] for p in pairs])
    wall_off, rc_off, _ = _median([p[1] for p in pairs])
    if rc_on or rc_off:
        return {"row": name, "wall_s": wall_on, "note": f"exit {rc_on or rc_off}"}
    saved = sorted(off[0] - on[0] for on, off in pairs)
    note += f"; without it {wall_off:.2f} s; saves {saved[len(saved) // 2]:.2f} s (paired median)"
    return {"row": name, "wall_s": wall_on, "note": note}
