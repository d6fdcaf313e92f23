"""`python -m bench`: this project's trainers against the seed's own path, in one
table (bench.cli says what each row is)."""

from bench.cli import main, parse_args
from bench.processes import sweep, sweep_phases

__all__ = ["main", "parse_args", "sweep", "sweep_phases"]
