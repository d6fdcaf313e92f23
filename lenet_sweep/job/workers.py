"""`hydra.launcher.devices`: fused workers, one a device, all pulling trials from one study.

A worker is the same sweep command in a process of its own, pinned to its device (CUDA: by
CUDA_VISIBLE_DEVICES; the CPU: by its share of the cores) and told it is a worker
(lenet_sweep.process.Role): it asks the study for trials under the ask lock, trains them as a refilled fused
group, records each (its MLflow child under the sweep's one parent run, its Optuna result, its
job dir) and stops when the study has nothing left to ask; it writes no results file and leaves
the parent run open. The driver (the command the user typed) starts them, waits, and then closes
the sweep as it always does. A worker killed mid-group (kill -9, out of memory) leaves its
trials RUNNING: the driver starts a new round, whose workers fail them first (this host: their
pid is gone; others: no heartbeat for grace_period) and run what is left. The study's storage
must be one every worker reaches: sqlite on one host, PostgreSQL (or JournalStorage) across.

`hydra.launcher.engine` says where the workers run: `local` (processes of this host), or through
the engines users already run: `submitit_local`, `slurm` (a job array, one job a worker, one GPU
each for a cuda device; `hydra.launcher.submitit`: hydra-submitit-launcher's keys) and `ray` (a task a
worker, `num_gpus=1` for a cuda device; `hydra.launcher.ray.init`: ray.init's). A remote worker
runs this Python, in this folder, with this project installed: a cluster's shared file system.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import time

from lenet_sweep import signals
from lenet_sweep.config.checks import resolve_device
from lenet_sweep.errors import Outage, UserError
from lenet_sweep.process import ROLE

log = logging.getLogger(__name__)
_OWN = ("device=", "hydra.launcher.devices=", "+hydra.launcher.devices=")


def resolve(devices, here: bool = False) -> list[str]:
    """`all`: every visible GPU (the CPU where there is none); else the list as given; `here`
    (workers on this host), each a device of this machine. Checked when the launcher is built,
    before any study; a SLURM job's or a Ray task's GPU is its host's."""
    if devices is None:
        return []
    shown = f"hydra.launcher.devices={_shown(devices)}"
    if devices in ("", []):
        raise UserError(f"{shown}: names no device; give null (this process), all, or a list")
    if devices == "all":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    for d in [devices] if isinstance(devices, str) else devices:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(d)):
            raise UserError(f"{shown}: {d} is not cpu, cuda or cuda:N")
        with contextlib.suppress(UserError):  # its own message names `device=`: ours names this
            if here:
                resolve_device(d)
            continue
        raise UserError(f"{shown}: {d} is not a device here ({_visible()}); use cpu or all")
    return [str(d) for d in ([devices] if isinstance(devices, str) else devices)]


def _shown(devices) -> str:
    return devices if isinstance(devices, str) else f"[{', '.join(map(str, devices))}]"


def _visible() -> str:
    import torch

    return f"{torch.cuda.device_count()} CUDA GPU(s) visible"


# A workers' engine: the module it needs, and this project's extra that installs it.
_ENGINE_NEEDS = {
    "submitit_local": ("submitit", "slurm"),
    "slurm": ("submitit", "slurm"),
    "ray": ("ray", "ray"),
}


def check_engine(engine: str) -> None:
    """The package a workers' engine needs is installed: said before any study exists."""
    needs = _ENGINE_NEEDS.get(engine)
    if needs and importlib.util.find_spec(needs[0]) is None:
        raise UserError(
            f"hydra.launcher.engine={engine} needs {needs[0]}, which is not installed: "
            f"pip install 'lenet_sweep[{needs[1]}]' (in a checkout: pip install -e '.[{needs[1]}]')"
        )


ENGINES = ("local", "submitit_local", "slurm", "ray")


def run(devices: list[str], settings=None) -> None:
    """Rounds of one worker a device until a round ends with every worker done; a round in
    which a worker was killed is followed by another (at most one a device). `settings`:
    hydra.launcher's engine, submitit and ray, and the sweep's stale_after and sweep_dir."""
    engine = (settings or {}).get("engine") or "local"
    for _ in range(len(devices) + 1):
        if engine == "local":
            codes = _round(devices)
        elif engine == "ray":
            codes = _ray(devices, (settings or {}).get("ray") or {})
        else:
            folder = os.path.join((settings or {}).get("sweep_dir") or os.getcwd(), ".submitit")
            codes = _submitit(devices, engine, (settings or {}).get("submitit") or {}, folder)
        if all(code == 0 for code in codes):
            return
        if 5 in codes:
            raise Outage("a worker stopped at an outage (its lines above say which store)")
        if any(code not in (0, -9, 137, -15, 143) for code in codes):
            raise UserError(f"workers ended with exit codes {codes}: their lines above say why")
        log.warning("a worker was killed (exit codes %s): its trials run again", codes)
        if engine != "local":  # on another host its trials fail by their silent heartbeat
            time.sleep((settings or {}).get("stale_after", 0))
    raise Outage(f"workers kept being killed: {codes}")


def _round(devices: list[str]) -> list[int]:
    cpu_share = max(1, (os.cpu_count() or 1) // max(1, devices.count("cpu")))
    procs = [_start_worker(d, cpu_share) for d in devices]
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


def _command(device: str) -> list[str]:
    """The sweep's own command line, as a worker on `device` (cpu or cuda)."""
    argv = [a for a in sys.argv[1:] if not a.lstrip("+").startswith(_OWN)]
    return [sys.executable, "-m", "lenet_sweep", *argv, f"device={device}"]


def _start_worker(device: str, cpu_share: int) -> subprocess.Popen:
    env = dict(os.environ, **ROLE.worker_env(device))
    if device.startswith("cuda"):  # pinned: the worker sees its GPU alone
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
    else:
        env["OMP_NUM_THREADS"] = str(cpu_share)
    log.info("worker on %s started", device)
    return subprocess.Popen(_command(device.partition(":")[0]), env=env)


def worker(command: list[str], env: dict[str, str], cwd: str) -> int:
    """A worker in a job of an engine (a SLURM job, a Ray task): the sweep's command in its
    folder, with the driver's lenet_sweep and MLflow settings; its exit code."""
    return subprocess.run(command, env={**os.environ, **env}, cwd=cwd).returncode


def _remote_args(device: str) -> tuple[list[str], dict[str, str], str]:
    passed = {k: v for k, v in os.environ.items() if k.startswith(("LENET_SWEEP_", "MLFLOW_"))}
    return _command(device.partition(":")[0]), {**passed, **ROLE.worker_env(device)}, os.getcwd()


KILLED = -9  # what a worker its engine lost (preempted, cancelled, its node gone) counts as


def _submitit(devices: list[str], engine: str, settings, folder: str) -> list[int]:
    """The workers as a submitit job array (on SLURM: one GPU a job for cuda devices); its
    folder `submitit_folder`, else `folder` (under the sweep dir)."""
    import submitit

    folder = settings.get("submitit_folder") or os.path.join(folder, "%j")
    cluster = "local" if engine == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**submitit_parameters(devices, engine, settings))
    jobs = executor.map_array(worker, *zip(*(_remote_args(d) for d in devices), strict=True))
    log.info("workers as %s jobs %s", engine, ", ".join(str(j.job_id) for j in jobs))
    _wait(lambda: all(j.done() for j in jobs), lambda: [j.cancel() for j in jobs])
    return [_code(j.result) for j in jobs]


def submitit_parameters(devices: list[str], engine: str, settings) -> dict:
    """submitit's parameters for the workers' jobs: one GPU a job for cuda devices, then the
    user's `hydra.launcher.submitit` in hydra-submitit-launcher's keys (partition, timeout_min,
    mem_gb, ...: as for hydra/launcher=slurm), renamed for submitit as that plugin does."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    prefix = "local" if engine == "submitit_local" else "slurm"
    given = {k: v for k, v in settings.items() if k != "submitit_folder"}
    gpus = {"gpus_per_node": 1} if any(d.startswith("cuda") for d in devices) else {}
    return {**gpus, **{k if k in base else f"{prefix}_{k}": v for k, v in given.items()}}


def _ray(devices: list[str], settings) -> list[int]:
    """The workers as Ray tasks (one GPU a task for cuda devices) on `ray.init(**init)`'s Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(**dict(settings.get("init") or {}))
    refs = []
    for d in devices:
        remote = ray.remote(num_cpus=1, num_gpus=int(d.startswith("cuda")), max_retries=0)(worker)
        refs.append(remote.remote(*_remote_args(d)))
    log.info("workers as %d Ray tasks", len(refs))

    def done() -> bool:
        return not ray.wait(refs, num_returns=len(refs), timeout=0)[1]

    _wait(done, lambda: [ray.cancel(r, force=True) for r in refs])
    return [_code(lambda r=r: ray.get(r)) for r in refs]


def _wait(done, cancel) -> None:
    """Poll until `done()`; a stop request cancels the workers and raises."""
    while not done():
        if signals.pending():
            cancel()
            signals.check()
        time.sleep(0.5)


def _code(result) -> int:
    try:
        return int(result())
    except Exception as e:  # noqa: BLE001 - the engine lost the worker: its trials run again
        log.warning("a worker was lost: %s", f"{type(e).__name__}: {e}"[:300])
        return KILLED
