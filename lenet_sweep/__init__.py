"""lenet_sweep: d2l's LeNet (train_ch6) as a Hydra + Optuna + MLflow sweep framework."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "conf"
OUTPUTS_DIR = PROJECT_ROOT / "outputs"

__all__ = ["CONFIG_DIR", "OUTPUTS_DIR", "PROJECT_ROOT"]
