"""The one exception type users see as a one-line error, and how errors are shown: one line,
credentials masked."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator

from hydra.errors import CompactHydraException

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")

# The user's own HYDRA_FULL_ERROR=1 (keep tracebacks). cli() sets this from the environment
# before it sets HYDRA_FULL_ERROR for its own use, so it is never read at import.
show_tracebacks = False


# Exit codes (README, "When things go wrong"); an internal error exits 1 with its traceback,
# an interrupt 128 + the signal's number (130 Ctrl-C, 143 SIGTERM).
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_SWEEP_FAILED, EXIT_OUTAGE = 2, 3, 4, 5


class UserError(CompactHydraException):
    """Bad input or environment: the message names the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class Outage(UserError):
    """A disk, tracking server or database the run needs is full or unreachable: not the run's
    fault. A sweep stops at the first one and the trial it hit runs again."""

    exit_code = EXIT_OUTAGE


# What drivers and HTTP clients raise when their server is away (matched by class name: no
# import of requests, urllib3, sqlalchemy or psycopg here).
_UNREACHABLE = {"ConnectionError", "ConnectTimeout", "MaxRetryError", "NewConnectionError"}
_AWAY = re.compile(
    r"connection (refused|failed|reset)|could not connect|server closed the connection|"
    r"failed to establish|max retries exceeded|timed? ?out|database is locked",
    re.IGNORECASE,
)
_FULL = re.compile(r"no space left on device|database or disk is full|disk quota", re.IGNORECASE)


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what caused it (its __cause__, else its __context__), once each: a chain
    may loop back (an error re-raised from itself)."""
    walked: set[int] = set()
    while error is not None and id(error) not in walked:
        walked.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def outage(error: BaseException, where: object = None) -> Outage | None:
    """The outage behind `error` (its causes walked), as one line that says what to do; None for
    any other error, and for a UserError, whose message already says it. `where`: the file of
    the store that raised it, for the full-disk line."""
    rerun = "then rerun the same command: nothing is lost, a sweep's study goes on"
    for seen in causes(error):
        if isinstance(seen, UserError):
            return seen if isinstance(seen, Outage) else None
        if isinstance(seen, BrokenPipeError):  # our stdout's reader left (`| head`): no store
            return None
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            what = _filesystem(seen.filename or where)
            return Outage(f"{what} is full ({seen.strerror}); free space, {rerun}")
        names = {kind.__name__ for kind in type(seen).__mro__}
        if _FULL.search(str(seen)):
            return Outage(f"{_filesystem(where)} is full ({describe(seen)}); free space, {rerun}")
        if (
            names & _UNREACHABLE
            or ("OperationalError" in names and _AWAY.search(str(seen)))
            or ("API request to" in str(seen) and _AWAY.search(str(seen)))
        ):
            return Outage(f"a store is unreachable ({describe(seen)}); start it, {rerun}")
    return None


def _filesystem(path: object) -> str:
    """`the filesystem at /mnt (holding /mnt/run/checkpoint.pt)`, as far as the path tells."""
    if not path:
        return "a store's filesystem"
    mount = os.path.abspath(str(path))
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    return f"the filesystem at {mount} (holding {path})"


def mask_url(text: str | None) -> str | None:
    """`scheme://user:secret@host` -> `scheme://user:***@host`, wherever it appears in `text`."""
    if text is None:
        return None
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's text (drivers and MLflow write pages), credentials masked."""
    text = (str(error).strip().splitlines() or [""])[0][:limit]
    return mask_url(text) or ""


def describe(error: BaseException) -> str:
    """`Type: first line`, for the parenthesis of a one-line message."""
    return f"{type(error).__name__}: {first_line(error)}"


def one_line(error: BaseException) -> str:
    """Hydra/OmegaConf's multi-line messages as one line (search paths and key dumps dropped)."""
    head, options = [], []
    for raw in str(error).splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith(
            (
                "Config search path",
                "provider=",
                "full_key:",
                "object_type=",
                "reference_type=",
                "See https://",
            )
        ):
            continue
        if raw.startswith("\t") and head and head[-1].startswith("Available options"):
            options.append(line)
            continue
        head.append(line.rstrip("."))
    if options:
        head[-1] = f"{head[-1].rstrip(':')}: {', '.join(options)}"
    cause = error.__cause__  # Hydra's own errors keep the useful part in the cause
    if not isinstance(error, UserError) and cause is not None and str(cause).strip():
        first = first_line(cause, limit=10_000).rstrip(".")
        if not any(first in line for line in head):
            head.append(first)
    return mask_url("; ".join(head) or type(error).__name__)


def exit_with(error: BaseException):
    """Print `error: <message>` as one line and exit with its code; HYDRA_FULL_ERROR=1 keeps the
    traceback."""
    if show_tracebacks:
        raise error
    sys.stderr.write(f"error: {one_line(error)}\n")
    sys.exit(getattr(error, "exit_code", EXIT_BAD_INPUT))
