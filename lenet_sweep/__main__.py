"""`python -m lenet_sweep [overrides]`: the Hydra entry point."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lenet_sweep import CONFIG_DIR
from lenet_sweep.app import run
from lenet_sweep.errors import UserError, exit_with


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train once (or once per trial under -m); returns the objective, final test accuracy."""
    try:
        return run(cfg)
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records it as the trial's failure
        exit_with(e)


if __name__ == "__main__":
    main()
