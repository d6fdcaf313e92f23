"""A run's training-curves PNG, drawn by a helper process started as the run's task starts
(or as the fused launcher starts its trials).

Why: importing matplotlib (0.25 s on 2 cores) and drawing (0.05 s) were the last 0.3 s of every
run, on the same core that had just spent 2.5 s importing torch and MLflow one module after the
other; and a fused sweep drew 64 figures one after the other between its trials' model writes.
The helper is its own interpreter (not a fork of a process that may hold threads and CUDA),
started before those imports: it imports matplotlib and draws a first figure on another core
meanwhile, then draws each PNG it is asked for while the run writes its totals and model
(`drawing`). It runs the same code (`figures.curves_figure`, saved as MLflow's `log_figure`
saves), so the PNG is the same bytes either way; anything wrong with it (not started, gone, an
error, no answer) and the PNG is drawn in the run's own process as before.

The protocol, one line each way: a JSON request `{"history": [...], "path": ...}` on the helper's
stdin; `ok` or the error on its stdout. The helper has its own session (a Ctrl-C in the terminal
is the run's to handle), stops when its stdin closes (the run exited or was killed), and is
stopped at the run's exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading

from lenet_sweep import PROJECT_ROOT

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 60.0  # its first answer may wait for matplotlib's font cache being built
_lock = threading.Lock()  # one request in flight, whichever thread records
_helper: subprocess.Popen | None = None


def start() -> None:
    """Start the helper (once per process; a process that cannot start one draws in-process)."""
    global _helper
    with _lock:
        if _helper is not None:
            return
        # This package's folder first on its path: found even after Hydra changed the directory.
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        try:
            _helper = subprocess.Popen([sys.executable, "-m", "lenet_sweep.painter"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, "PYTHONPATH": path})  # fmt: skip
        except OSError as e:
            log.debug("no curves helper (%s): curves drawn in-process", e)
            return
    atexit.register(stop)


def stop() -> None:
    """Stop the helper now: nothing is in flight once the lock is held, so no PNG is cut short."""
    global _helper
    with _lock:
        helper, _helper = _helper, None
    if helper is not None:
        _end(helper)


def _end(helper: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        helper.stdin.close()
    helper.kill()  # it may still be importing matplotlib: no need to wait for that
    helper.wait()
    helper.stdout.close()


@contextlib.contextmanager
def drawing(history: list[dict], path: str):
    """The training-curves PNG of `history` written to `path` while the block runs (by the
    helper; if it cannot, here after the block): on disk when the block has ended normally."""
    global _helper
    with _lock:  # held through the block: one request in flight, its answer read before the next
        helper = _helper
        if helper is not None and not _send(helper, history, path):
            _end(helper)
            helper = _helper = None
        try:
            yield
        finally:
            drawn = helper is not None and _answered(helper)
            if helper is not None and not drawn:
                _end(helper)
                _helper = None
    if not drawn:
        from lenet_sweep.figures import curves_figure

        curves_figure(history).savefig(path)


def _send(helper: subprocess.Popen, history: list[dict], path: str) -> bool:
    try:
        helper.stdin.write(json.dumps({"history": history, "path": str(path)}).encode() + b"\n")
        helper.stdin.flush()
        return True
    except (OSError, ValueError) as e:
        log.debug("curves helper: %s; drawing in-process", e)
        return False


def _answered(helper: subprocess.Popen) -> bool:
    """Wait for the answer to the request in flight; False on anything but `ok`."""
    answer = b""
    try:
        while not answer.endswith(b"\n"):
            ready, _, _ = select.select([helper.stdout], [], [], ANSWER_TIMEOUT_S)
            chunk = os.read(helper.stdout.fileno(), 4096) if ready else b""
            if not chunk:  # gone, or no answer in time
                break
            answer += chunk
    except (OSError, ValueError) as e:
        answer = str(e).encode()
    if answer.strip() == b"ok":
        return True
    log.debug("curves helper: %s; drawing in-process", answer.decode(errors="replace").strip())
    return False


def _serve() -> None:
    """The helper: import and warm matplotlib, then answer requests until stdin closes."""
    import io
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from lenet_sweep.figures import curves_figure

    # The first figure loads the fonts and the renderer: done now, while the run imports.
    curves_figure([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}]).savefig(
        io.BytesIO(), format="png"
    )
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            curves_figure(request["history"]).savefig(request["path"])
            answer = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the run, which draws it itself
            answer = f"{type(e).__name__}: {e}".replace("\n", " ")
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
