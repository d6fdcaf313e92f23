"""Trials in flight on a process launcher, without Hydra's batch barrier: n_jobs trials run at
once, and the moment one ends its result is told and the study's next trial launched.

Workaround: Hydra's Launcher API takes a batch and blocks until all of it has ended
(facebookresearch/hydra#3091, closed as not planned). Per launcher, what launches one trial
without waiting for the others:
- joblib: the loky executor hydra-joblib-launcher's Parallel runs on, handed the plugin's own
  `execute_job` one trial at a time (Parallel called from a thread would run its jobs in that
  thread, in this process: joblib/joblib#865);
- submitit (local, SLURM): the plugin's own `launch` of one trial in a thread of its own (it only
  submits the job and waits on it);
- Ray (local or a cluster): the plugin's own `launch_job_on_ray` for one trial, whose ObjectRef
  is a future (its `launch` submits them all, then waits on each).
Each adapter, `adapter(launcher)`, is a `submit(number, overrides) -> Future[JobReturn]`; which
launcher takes which is config.plugins.DISPATCH. Basic (in this process) and Ray on AWS keep
batches. It can go when Hydra's launchers offer a launch that does not block.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class _Loky:
    def __init__(self, launcher) -> None:
        from joblib.externals.loky import get_reusable_executor

        self.launcher = launcher
        cores = os.cpu_count() or 1
        workers = launcher.joblib.get("n_jobs") or -1
        workers = cores if workers < 0 else workers
        # As joblib's Parallel does: each worker's thread pools get their share of the cores (a
        # pool of 2 on 2 cores without it: each trial half as fast).
        share = str(max(1, cores // workers))
        env = {var: os.environ.get(var, share) for var in _THREAD_VARS}
        self.executor = get_reusable_executor(max_workers=workers, env=env)

    def __call__(self, number: int, overrides: list[str]) -> Future:
        from hydra.core.singleton import Singleton
        from hydra_plugins.hydra_joblib_launcher._core import execute_job

        launcher = self.launcher
        Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        return self.executor.submit(
            execute_job,
            number,
            overrides,
            launcher.hydra_context,
            launcher.config,
            launcher.task_function,
            Singleton.get_state(),
        )

    def close(self) -> None:
        """Interrupted: the workers go with their jobs (their trials are failed for a rerun)."""
        self.executor.shutdown(wait=False, kill_workers=True)


class _Threads:
    def __init__(self, launcher) -> None:
        self.launcher = launcher

    def __call__(self, number: int, overrides: list[str]) -> Future:
        future: Future = Future()

        def launch() -> None:
            try:
                future.set_result(self.launcher.launch([overrides], initial_job_idx=number)[0])
            except BaseException as e:  # noqa: BLE001 - the job's end, told by the sweep
                future.set_exception(e)

        # A daemon: an interrupted sweep does not wait on a job it has failed for a rerun.
        threading.Thread(target=launch, name=f"trial {number}", daemon=True).start()
        return future

    def close(self) -> None:
        pass


class _Ray:
    def __init__(self, launcher) -> None:
        from hydra_plugins.hydra_ray_launcher._launcher_util import start_ray

        self.launcher = launcher
        # As the plugin's launch does: enough object store in CI (ray-project/ray#11966).
        launcher.ray_cfg.init.setdefault("object_store_memory", 78643200)
        start_ray(launcher.ray_cfg.init)

    def __call__(self, number: int, overrides: list[str]) -> Future:
        from hydra.core.singleton import Singleton
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray
        from omegaconf import open_dict

        launcher = self.launcher
        Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        config = launcher.hydra_context.config_loader.load_sweep_config(
            launcher.config, list(overrides)
        )
        with open_dict(config):
            config.hydra.job.id = f"job_id_for_{number}"
            config.hydra.job.num = number
        return launch_job_on_ray(
            launcher.hydra_context,
            launcher.ray_cfg.remote,
            config,
            launcher.task_function,
            Singleton.get_state(),
        ).future()

    def close(self) -> None:
        pass  # an interrupted sweep's tasks end as in batches: their trials were failed for a rerun


ADAPTERS = {"joblib": _Loky, "submitit": _Threads, "ray": _Ray}  # by config.plugins.DISPATCH
