"""Credentials in URLs never reach logs, MLflow or printed summaries."""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")


def mask_url(text: str | None) -> str | None:
    """`scheme://user:secret@host` -> `scheme://user:***@host`, wherever it appears in `text`."""
    if text is None:
        return None
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
