"""A throwaway PostgreSQL server on loopback, started from Debian's binaries for a test."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb/postgres refuse to run as root; CI runs as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, root: Path):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.bin = Path(bins[-1]).parent
        self.root, self.port = root, _free_port()
        self.data = root / "pgdata"

    def start(self, password: str) -> str:
        """Start the server; returns a URL with credentials for database `optuna`."""
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pw"
        pwfile.write_text(password)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "lenet",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                ]
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-w",
                    "-l",
                    str(self.root / "log"),
                    "-o",
                    f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        return self.create_database("optuna")

    def create_database(self, name: str) -> str:
        """Another database on the running server; returns its URL (same credentials)."""
        password = (self.root / "pw").read_text()
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run(
            [
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "lenet",
                name,
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        return f"postgresql://lenet:{password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            capture_output=True,
        )
