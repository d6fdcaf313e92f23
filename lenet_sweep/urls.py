"""Store URLs: credentials masked wherever they are shown, sqlite URLs read in one place."""

from __future__ import annotations

import re
from pathlib import Path

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")
SQLITE = "sqlite:///"


def mask_url(text: str | None) -> str | None:
    """`scheme://user:secret@host` -> `scheme://user:***@host`, wherever it appears in `text`."""
    if text is None:
        return None
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def sqlite_path(url: str | None) -> Path | None:
    """The file behind a `sqlite:///…` URL (relative paths stay relative); None for other URLs."""
    if not url or not url.startswith(SQLITE):
        return None
    return Path(url[len(SQLITE) :])
