"""Where a fused sweep's wall time went, read off its log's timestamps.

    python scripts/sweep_phases.py SWEEP_LOG START_EPOCH_S END_EPOCH_S

START/END: the process's start and end as `date +%s.%N` printed them (scripts/device-check).
Phases: start-up (to "Launching"), preparing the jobs (to "training ... as one group"), training
with the per-epoch hooks and the leaving trials' records (to the last epoch line), ending the runs
(to the sweep's summary line), closing (results, the parent run's plots, to the process's end).
"""

from __future__ import annotations

import re
import sys
from datetime import datetime

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
MARKS = [("start-up", r"Launching \d+ jobs"), ("preparing the jobs", r"trials as one group"),
         ("training + hooks + records", r"epoch \d+/\d+:"),
         ("ending the runs", r"sweep \S+: .* trial\(s\) run here")]  # fmt: skip


def _time(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def phases(lines: list[str], start: float, end: float) -> list[tuple[str, float]]:
    """(phase, seconds) in order; a phase's end is the first line of the next mark (the last
    epoch line for training)."""
    found = {}
    for line in lines:
        t = _time(line)
        for name, pattern in MARKS:
            if t is not None and re.search(pattern, line):
                last = name == "training + hooks + records"
                found[name] = t if last or name not in found else found[name]
    out, previous = [], start
    for name, _ in MARKS:
        if name in found:
            out.append((name, found[name] - previous))
            previous = found[name]
    out.append(("closing", end - previous))
    return out


def main() -> None:
    path, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    with open(path) as f:
        rows = phases(f.read().splitlines(), start, end)
    print(", ".join(f"{name} {seconds:.1f} s" for name, seconds in rows) + f"; {end - start:.1f} s")


if __name__ == "__main__":
    main()
