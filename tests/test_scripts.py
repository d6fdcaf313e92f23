"""scripts/: the helpers scripts/device-check runs on a lent GPU, checked here on what they read."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_phases_splits_a_sweep_log_at_its_marks(tmp_path):
    def at(s: str) -> float:
        return datetime.strptime(f"2026-11-26 08:00:{s}", "%Y-%m-%d %H:%M:%S,%f").timestamp()

    log = tmp_path / "sweep.log"
    log.write_text("\n".join([
        "[2026-11-26 08:00:05,000][HYDRA] Launching 64 jobs fused",
        "[2026-11-26 08:00:12,500][HYDRA] training 64 trials as one group on cuda:0",
        "[2026-11-26 08:00:13,000][HYDRA] t000 lr=0.1 ep=2: epoch 1/2: train loss 2.3",
        "[2026-11-26 08:00:40,000][HYDRA] t001 lr=0.2 ep=20: epoch 20/20: train loss 0.4",
        "[2026-11-26 08:00:41,000][HYDRA] MLflow run 0123: mlflow ui ...",
        "[2026-11-26 08:00:42,000][HYDRA] sweep lenet_sweep: 64 complete; 64 trial(s) run here in 37s",
    ]))  # fmt: skip
    out = subprocess.run([sys.executable, ROOT / "scripts" / "sweep_phases.py", log,
                          str(at("01,000")), str(at("45,000"))],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.strip() == ("start-up 4.0 s, preparing the jobs 7.5 s, training + hooks + records "
                           "27.5 s, ending the runs 2.0 s, closing 3.0 s; 44.0 s")  # fmt: skip
