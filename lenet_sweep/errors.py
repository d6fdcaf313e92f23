"""The one exception type users see as a one-line error, and how it is shown."""

import os
import sys

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Bad input or environment: the message names the problem and the fix."""


def exit_with(error: UserError, code: int = 2):
    """Print `error: <message>` as one line and exit; HYDRA_FULL_ERROR=1 keeps the traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    sys.stderr.write(f"error: {error}\n")
    sys.exit(code)
