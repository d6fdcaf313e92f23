"""`hydra/launcher=fused`: registers the launcher and delegates (lenet_sweep.job.fused_launch)."""

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

from lenet_sweep.config.plugins import FusedLauncherConf

ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf)


class FusedLauncher(Launcher):
    def __init__(self, max_group=None, devices=None, engine="local", submitit=None, ray=None):
        self.max_group, self.devices = max_group, devices
        self.engine, self.submitit, self.ray = engine, submitit, ray

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from lenet_sweep.job.fused_launch import FusedLaunch

        on = {"engine": self.engine, "submitit": self.submitit, "ray": self.ray}
        self.fused = FusedLaunch(hydra_context, config, self.max_group, self.devices, on)

    def launch(self, job_overrides, initial_job_idx: int):
        return self.fused.launch(job_overrides, initial_job_idx)

    def stream(self, feed, slots: int, refill: bool = True) -> None:
        """lenet_sweep.sweep.protocol.TrialFeed: each freed slot takes the feed's next trial."""
        return self.fused.stream(feed, slots, refill)
