"""The one exception type users see as a one-line error, and how errors are shown: one line,
credentials masked."""

from __future__ import annotations

import re
import sys

from hydra.errors import CompactHydraException

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")

# The user's own HYDRA_FULL_ERROR=1 (keep tracebacks). cli() sets this from the environment
# before it sets HYDRA_FULL_ERROR for its own use, so it is never read at import.
show_tracebacks = False


# Exit codes (README, "When things go wrong"); an internal error exits 1 with its traceback,
# an interrupt 128 + the signal's number (130 Ctrl-C, 143 SIGTERM).
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_SWEEP_FAILED = 2, 3, 4


class UserError(CompactHydraException):
    """Bad input or environment: the message names the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


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
