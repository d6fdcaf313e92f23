"""sqlite stores on disk, shared by MLflow's store and Optuna's storage: their URLs read in one
place, writability checked up front, and creation under a lock, so that parallel first starts
never race to build a store's tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lenet_sweep.errors import UserError, causes

SQLITE = "sqlite:///"


def sqlite_path(url: str | None) -> Path | None:
    """The file behind a `sqlite:///…` URL (relative paths stay relative); None for other URLs."""
    if not url or not url.startswith(SQLITE):
        return None
    return Path(url[len(SQLITE) :])


JOURNAL = "journal:///"  # hydra.sweeper.storage=journal:///<file>: Optuna's JournalStorage


def journal_path(url: str | None) -> Path | None:
    """The file behind a `journal:///<path>` storage (an absolute path); None for other URLs."""
    if not url or not url.startswith(JOURNAL):
        return None
    return Path("/" + url[len(JOURNAL) :].lstrip("/"))


def check_journal(url: str | None) -> None:
    """A `journal:///<file>` storage names a file that is a journal or none yet: a folder, or a
    file whose lines are not JSON objects (Optuna replays them at open), is refused with one
    line and left as it was."""
    path = journal_path(url)
    if path is None:
        return
    if path.is_dir():
        raise UserError(
            f"hydra.sweeper.storage={url}: {path} is a folder; give a file in it, e.g. "
            f"{JOURNAL}{path / 'study.log'}"
        )
    if not path.is_file():
        return
    try:
        with open(path, "rb") as journal:
            for line in journal:
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("a line that is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"Optuna journal {path} is damaged ({type(e).__name__}: {str(e)[:120]}); move it "
            "aside (a new one is made in its place) or put back a copy"
        ) from e


def store_file(error: BaseException, mlflow_uri: str | None, storage: str | None = None):
    """The sqlite file of the store that raised `error` (MLflow's or the study's), if one did."""
    chain = {type(seen).__name__ for seen in causes(error)}
    if "MlflowException" in chain:
        return sqlite_path(mlflow_uri)
    return sqlite_path(storage) if "OperationalError" in chain else None


def check_writable_dir(folder: Path, what: str, fix: str) -> None:
    """`folder`, or the nearest existing folder above it, takes new files (root ignores modes, so
    this writes a probe: immutable files and read-only mounts refuse it)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {existing} ({e.strerror}); {fix}") from e


def check_sqlite(url: str, what: str, key: str, own_dir: Path) -> None:
    """A sqlite store can be created or written: its folder exists (only `own_dir`, the project's
    outputs/, is made for it), and the folder and the file take writes. `key` sets the URL."""
    path = sqlite_path(url)
    if path is None:
        return
    what, fix = f"{what} {url}", f"make it writable or set {key} to another file"
    if not path.parent.is_dir():
        if path.parent.resolve() != own_dir.resolve():
            raise UserError(
                f"{what}: folder {path.parent} does not exist; "
                f"create it or set {key} to a file in an existing folder"
            )
        check_writable_dir(path.parent, what, fix)
        path.parent.mkdir(parents=True, exist_ok=True)
    check_writable_dir(path.parent, what, fix)  # sqlite writes its journal beside the file
    if path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))  # opens for writing, writes nothing
        except OSError as e:
            raise UserError(f"{what}: {path} is not writable ({e.strerror}); {fix}") from e


def check_intact(url: str, what: str) -> None:
    """A damaged sqlite file is refused before anything writes into it (sqlite's quick_check,
    read-only)."""
    import sqlite3

    path = sqlite_path(url)
    if path is None or not path.is_file() or not path.stat().st_size:
        return
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        ) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as e:
        if "locked" in str(e):
            return  # busy, not damaged: the store's own open waits for it
        problems = [str(e)]
    if problems != ["ok"]:
        raise UserError(
            f"{what} {path} is damaged ({'; '.join(problems)[:200]}); move it aside (a new one "
            "is made in its place) or put back a copy"
        )


@contextlib.contextmanager
def file_lock(url: str) -> Iterator[None]:
    """Hold `<file>.lock` beside a store in a file (sqlite, an Optuna journal): while it may be
    created or migrated, and for the sweep's count-then-ask. Other stores pass (a server or
    database serialises its own)."""
    if path := sqlite_path(url):
        lock = f"{path}.lock"
    elif path := journal_path(url):  # `<file>.lock` is the journal's own (JournalFileBackend)
        lock = f"{path}.ask-lock"
    else:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
