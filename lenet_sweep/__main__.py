"""`python -m lenet_sweep [overrides]` (lenet_sweep.cli)."""

from lenet_sweep.cli import cli, main  # noqa: F401 - `main`: the Hydra app launchers import

if __name__ == "__main__":
    cli()
