"""This process: its host, whether another process of this host is alive, and its role in a
sweep, read once from the environment into one object (`ROLE`)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

HOST = socket.gethostname()
# In a fused worker's environment (lenet_sweep.job.workers): its device. The driver (the command
# a user typed) sets it for each worker it starts; nothing else reads the variable.
WORKER_ENV = "LENET_SWEEP_WORKER"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is still there."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


@dataclass(frozen=True)
class Role:
    """A sweep's process is its driver (the command a user typed: it starts any workers, then
    closes the sweep: results, best trial, the parent run's end) or a fused worker on one
    device (it trains what it asks from the study and leaves the closing to the driver). A
    trial's job is told by its own environment while it runs (lenet_sweep.sweep.trial_link)."""

    worker_device: str | None = None  # set: a worker on this device

    @property
    def is_worker(self) -> bool:
        return self.worker_device is not None

    @property
    def is_driver(self) -> bool:
        return self.worker_device is None

    @classmethod
    def from_env(cls, env=os.environ) -> Role:
        return cls(env.get(WORKER_ENV) or None)

    def worker_env(self, device: str) -> dict[str, str]:
        """What the driver puts into a worker's environment to make it one."""
        return {WORKER_ENV: device}


ROLE = Role.from_env()  # read once, at import
