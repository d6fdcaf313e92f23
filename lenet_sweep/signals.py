"""Ctrl-C and SIGTERM as a request to stop, honoured at the next batch boundary.

Raising straight from a signal handler can land inside a garbage-collector callback, where
Python swallows it; so the handler only sets a flag, and the training loop and the sweep loop
call `check()` at safe points. A second signal raises at once.
"""

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """Stop requested by SIGTERM (or SIGINT); MLflow runs end KILLED, trials FAIL."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


_requested: list[int] = []  # the signals received since the outermost stop_on_signals began
_depth = [0]


def _handler(signum, frame):
    _requested.append(signum)
    if len(_requested) > 1:
        raise Terminated(signum)


def check() -> None:
    """Raise Terminated if a stop was requested."""
    if _requested:
        raise Terminated(_requested[0])


def pending() -> bool:
    """Whether a stop was requested (for work not worth starting: `check` raises later)."""
    return bool(_requested)


@contextlib.contextmanager
def stop_on_signals():
    """Install the flag handlers for SIGINT and SIGTERM (main thread only), restoring the old."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only (e.g. threaded launchers)
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not _depth[0]:  # the request was handled: the next run or sweep starts afresh
            _requested.clear()
