"""lenet_sweep: d2l's LeNet (train_ch6) as a Hydra + Optuna + MLflow sweep framework."""

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "conf"
OUTPUTS_DIR = PROJECT_ROOT / "outputs"

# Hydra's run/sweep dirs use ${project_root:} so outputs land in <project>/outputs from any cwd.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))

__all__ = ["CONFIG_DIR", "OUTPUTS_DIR", "PROJECT_ROOT"]
