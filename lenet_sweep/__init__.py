"""lenet_sweep: d2l's LeNet (train_ch6) as a Hydra + Optuna + MLflow sweep framework."""

from pathlib import Path

_CODE_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "conf"
# A checkout (an editable install) keeps outputs and relative store paths beside the code; an
# installed package (a wheel, `pip install .`) in the directory it is started from, as Hydra does.
PROJECT_ROOT = _CODE_ROOT if (_CODE_ROOT / "pyproject.toml").is_file() else Path.cwd()
OUTPUTS_DIR = PROJECT_ROOT / "outputs"

__all__ = ["CONFIG_DIR", "OUTPUTS_DIR", "PROJECT_ROOT"]
