"""lenet_sweep: d2l's LeNet (train_ch6) as a Hydra + Optuna + MLflow sweep framework."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CODE_ROOT = _PACKAGE.parent
CHECKOUT = (_CODE_ROOT / "pyproject.toml").is_file()
# The configs: conf/ at the top of a checkout; inside the package once installed (pyproject.toml).
CONFIG_DIR = _CODE_ROOT / "conf" if CHECKOUT else _PACKAGE / "conf"
# A checkout (an editable install) keeps outputs and relative store paths beside the code; an
# installed package (a wheel, `pip install .`) in the directory it is started from, as Hydra does.
PROJECT_ROOT = _CODE_ROOT if CHECKOUT else Path.cwd()
OUTPUTS_DIR = PROJECT_ROOT / "outputs"

__all__ = ["CONFIG_DIR", "OUTPUTS_DIR", "PROJECT_ROOT"]
