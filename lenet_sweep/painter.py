"""A run's training-curves PNG and a sweep's Optuna plots, drawn by a helper process started as
the run's task starts (or as the fused launcher starts its trials, or as a sweep starts).

Why: importing matplotlib (0.25 s on 2 cores) and drawing (0.05 s) were the last 0.3 s of every
run, on the same core that had just spent 2.5 s importing torch and MLflow one module after the
other; and a fused sweep drew 64 figures one after the other between its trials' model writes.
The helper is its own interpreter (not a fork of a process that may hold threads and CUDA),
started before those imports: it imports matplotlib and draws a first figure on another core
meanwhile, then draws each PNG it is asked for while the run writes its totals and model
(`drawing`). It runs the same code (`figures.curves_figure`, saved as MLflow's `log_figure`
saves), so the PNG is the same bytes either way; anything wrong with it (not started, gone, an
error, no answer) and the PNG is drawn in the run's own process as before.

A sweep's process asks it for Optuna's plots of the study at its end (`study_plots`): started
with `study_plots=True`, the helper imports Optuna's plotting and sklearn's forest for the
importances (about 1.3 s on 2 cores) and draws a small study's plots once while the sweep starts.

The protocol, one line each way: a JSON request on the helper's stdin, `{"history": [...],
"path": ...}` (curves) or `{"study": <base64 pickle of its trials>, "objectives": [...],
"folder": ...}` (plots); `{"ok": <result>}` or `{"error": ...}` on its stdout. The helper has
its own session (a Ctrl-C in the terminal is the run's to handle), stops when its stdin closes
(the run exited or was killed), and is stopped at the run's exit.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import pickle
import select
import subprocess
import sys
import threading

from lenet_sweep import PROJECT_ROOT

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 60.0  # its first answer may wait for matplotlib's font cache being built
_lock = threading.Lock()  # one request in flight, whichever thread records
_helper: subprocess.Popen | None = None


def start(study_plots: bool = False) -> None:
    """Start the helper (once per process; a process that cannot start one draws in-process);
    `study_plots`: it also readies Optuna's plots (a sweep's process)."""
    global _helper
    with _lock:
        if _helper is not None:
            return
        # This package's folder first on its path: found even after Hydra changed the directory.
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        args = [sys.executable, "-m", "lenet_sweep.painter", *(["--study-plots"] * study_plots)]
        try:
            _helper = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
    with _asked({"history": history, "path": str(path)}) as answer:
        yield
    if not answer:
        from lenet_sweep.figures import curves_figure

        curves_figure(history).savefig(path)


def study_plots(study, objectives: list[str], folder: str) -> dict[str, str | None]:
    """Optuna's plots of `study` drawn into `folder` (figures.draw_study_plots: which were, and
    why not), by the helper from a copy of the study in its memory, else here."""
    payload = pickle.dumps((study.study_name, study.directions, study.get_trials(deepcopy=False)))
    request = {"study": base64.b64encode(payload).decode(), "objectives": objectives,
               "folder": str(folder)}  # fmt: skip
    with _asked(request) as answer:
        pass
    if answer:
        return answer[0]
    from lenet_sweep.figures import draw_study_plots

    return draw_study_plots(study, objectives, folder)


@contextlib.contextmanager
def _asked(request: dict):
    """Send `request` to the helper, run the block, then read the answer: yields a list that
    holds the helper's result after the block, or stays empty (the caller does it itself). A
    helper that failed once is ended, not asked again."""
    global _helper
    answer: list = []
    with _lock:  # held through the block: one request in flight, its answer read before the next
        helper = _helper
        if helper is not None and not _send(helper, request):
            _end(helper)
            helper = _helper = None
        try:
            yield answer
        finally:
            if helper is not None:
                answer.extend(_answered(helper))
                if not answer:
                    _end(helper)
                    _helper = None


def _send(helper: subprocess.Popen, request: dict) -> bool:
    """Write the request a pipe's atomic chunk at a time: a large study's does not fit the pipe,
    and a helper that stopped reading must not hang the run."""
    data = json.dumps(request).encode() + b"\n"
    try:
        fd = helper.stdin.fileno()
        while data:
            if not select.select([], [fd], [], ANSWER_TIMEOUT_S)[1]:
                raise TimeoutError(f"no request taken in {ANSWER_TIMEOUT_S:.0f} s")
            data = data[os.write(fd, data[: select.PIPE_BUF]) :]
        return True
    except (OSError, ValueError) as e:
        log.debug("painter helper: %s; drawing in-process", e)
        return False


def _answered(helper: subprocess.Popen) -> list:
    """Wait for the answer to the request in flight: [its result], or [] on anything but ok."""
    answer = b""
    try:
        while not answer.endswith(b"\n"):
            ready, _, _ = select.select([helper.stdout], [], [], ANSWER_TIMEOUT_S)
            chunk = os.read(helper.stdout.fileno(), 4096) if ready else b""
            if not chunk:  # gone, or no answer in time
                break
            answer += chunk
        reply = json.loads(answer)
        if "ok" in reply:
            return [reply["ok"]]
    except (OSError, ValueError) as e:
        answer = str(e).encode()
    log.debug("painter helper: %s; drawing in-process", answer.decode(errors="replace").strip())
    return []


def _serve(study_plots: bool) -> None:
    """The helper: import and warm matplotlib (and Optuna's plots), then answer requests until
    stdin closes."""
    import io
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from lenet_sweep.figures import curves_figure

    # The first figure loads the fonts and the renderer: done now, while the run imports.
    curves_figure([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}]).savefig(
        io.BytesIO(), format="png"
    )
    if study_plots:
        _warm_study_plots()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            answer = {"ok": _study_plots(request) if "study" in request else _curves(request)}
        except Exception as e:  # noqa: BLE001 - reported to the run, which draws it itself
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _curves(request: dict) -> None:
    from lenet_sweep.figures import curves_figure

    curves_figure(request["history"]).savefig(request["path"])


def _study_plots(request: dict) -> dict[str, str | None]:
    import optuna

    from lenet_sweep.figures import draw_study_plots

    name, directions, trials = pickle.loads(base64.b64decode(request["study"]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, directions=directions)  # in memory
    study.add_trials(trials)
    return draw_study_plots(study, request["objectives"], request["folder"])


def _warm_study_plots() -> None:
    """Draw a small study's plots once: the imports (Optuna's plots, sklearn's forest for the
    importances) and a first drawing of each, before the sweep asks."""
    import tempfile

    import optuna

    from lenet_sweep.figures import draw_study_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for x in (0.1, 0.5, 0.9):
        study.enqueue_trial({"x": x})
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=3)
    with tempfile.TemporaryDirectory() as tmp:
        draw_study_plots(study, ["value"], tmp)


if __name__ == "__main__":
    _serve("--study-plots" in sys.argv[1:])
