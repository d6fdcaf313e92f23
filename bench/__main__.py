"""`python -m bench` (bench.cli)."""

from bench.cli import main

if __name__ == "__main__":
    main()
