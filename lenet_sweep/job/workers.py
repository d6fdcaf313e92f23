"""`hydra.launcher.devices`: fused workers, one a device, all pulling trials from one study.

A worker is the same sweep command in a process of its own, pinned to its device (CUDA: by
CUDA_VISIBLE_DEVICES; the CPU: by its share of the cores) and told it is a worker
(WORKER_ENV): it asks the study for trials under the ask lock, trains them as a refilled fused
group, records each (its MLflow child under the sweep's one parent run, its Optuna result, its
job dir) and stops when the study has nothing left to ask; it writes no results file and leaves
the parent run open. The driver (the command the user typed) starts them, waits, and then closes
the sweep as it always does. A worker killed mid-group (kill -9, out of memory) leaves its
trials RUNNING: the driver starts a new round, whose workers fail them first (this host: their
pid is gone; others: no heartbeat for grace_period) and run what is left. The study's storage
must be one every worker reaches: sqlite on one host, PostgreSQL (or JournalStorage) across.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from lenet_sweep import signals
from lenet_sweep.errors import Outage, UserError
from lenet_sweep.sweep.protocol import WORKER_ENV

log = logging.getLogger(__name__)
_OWN = ("device=", "hydra.launcher.devices=", "+hydra.launcher.devices=")


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def resolve(devices) -> list[str]:
    """`all`: every visible GPU (the CPU where there is none); else the list as given."""
    if devices in (None, "", []):
        return []
    if devices == "all":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if isinstance(devices, str):
        devices = [devices]
    for d in devices:
        if str(d) != "cpu" and not str(d).startswith("cuda"):
            raise UserError(f"hydra.launcher.devices: {d!r} is not cpu, cuda or cuda:N")
    return [str(d) for d in devices]


def run(devices: list[str]) -> None:
    """Rounds of one worker a device until a round ends with every worker done; a round in
    which a worker was killed is followed by another (at most one a device)."""
    for _ in range(len(devices) + 1):
        codes = _round(devices)
        if all(code == 0 for code in codes):
            return
        if 5 in codes:
            raise Outage("a worker stopped at an outage (its lines above say which store)")
        if any(code not in (0, -9, 137, -15, 143) for code in codes):
            raise UserError(f"workers ended with exit codes {codes}: their lines above say why")
        log.warning("a worker was killed (exit codes %s): its trials run again", codes)
    raise Outage(f"workers kept being killed: {codes}")


def _round(devices: list[str]) -> list[int]:
    cpu_share = max(1, (os.cpu_count() or 1) // max(1, devices.count("cpu")))
    procs = [_start(d, cpu_share) for d in devices]
    try:
        while any(p.poll() is None for p in procs):
            if signals.pending():  # Ctrl-C / SIGTERM: the workers stop as a sweep does
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait()
                signals.check()
            time.sleep(0.2)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return [p.returncode for p in procs]


def _start(device: str, cpu_share: int) -> subprocess.Popen:
    argv = [a for a in sys.argv[1:] if not a.lstrip("+").startswith(_OWN)]
    env = dict(os.environ, **{WORKER_ENV: device})
    if device.startswith("cuda"):  # pinned: the worker sees its GPU alone
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
        device = "cuda"
    else:
        env["OMP_NUM_THREADS"] = str(cpu_share)
    log.info("worker on %s started", env[WORKER_ENV])
    return subprocess.Popen(
        [sys.executable, "-m", "lenet_sweep", *argv, f"device={device}"], env=env
    )
