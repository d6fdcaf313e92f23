"""Process-level speed settings: the only ones the project keeps, each entered from one call.

Each buys time on a path users run (measured in docs/performance.md) and changes no number.
`LENET_SWEEP_SPEEDUPS=none` turns them all off; a comma-separated list keeps only those named.

- startup_gc:    the collector slowed while a run imports, so it does not walk that heap over and over.
- host_memory:   on the CPU, glibc keeps the memory a step frees, so steps do not page it in anew.
- fast_exit:     the command line exits without freeing every module's objects one by one.
- channels_last: on the CPU, nets and fused groups in channels-last layout, oneDNN's faster kernels.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import gc
import logging
import os
import sys
import threading

NAMES = ("startup_gc", "host_memory", "fast_exit", "channels_last")
ENV = "LENET_SWEEP_SPEEDUPS"


def check_env() -> str | None:
    """What is wrong with $LENET_SWEEP_SPEEDUPS, in one line; None when it reads."""
    chosen = os.environ.get(ENV, "all").replace(" ", "")
    if chosen in ("all", "none") or all(n in NAMES for n in chosen.split(",")):
        return None
    return (
        f"{ENV}={chosen}: not a speed setting; give all, none, or some of "
        f"{','.join(NAMES)} (comma-separated)"
    )


def enabled(name: str) -> bool:
    """Whether the speed setting `name` is on (all are, unless $LENET_SWEEP_SPEEDUPS says)."""
    chosen = os.environ.get(ENV, "all").replace(" ", "")
    return chosen == "all" or name in chosen.split(",")


# --- startup_gc: young collections 70x rarer, full ones ~1,400x, until training starts --------
START_UP_PACE = (50_000, 20, 100)
_paused_from: tuple[int, ...] | None = None


def slow_startup_gc() -> bool:
    """Slow the collector for start-up (the command line, before its imports). A collector that
    is off or already slower is left alone; returns whether the pace changed."""
    global _paused_from
    young = gc.get_threshold()[0]
    if not enabled("startup_gc") or _paused_from is not None:
        return False
    if not gc.isenabled() or not 0 < young < START_UP_PACE[0]:
        return False
    _paused_from = gc.get_threshold()
    gc.set_threshold(*START_UP_PACE)
    return True


def _restore_gc() -> None:
    """Freeze the start-up heap (it lives to the end) and collect at the old pace again."""
    global _paused_from
    if _paused_from is None:
        return
    gc.freeze()
    gc.set_threshold(*_paused_from)
    _paused_from = None


# --- host_memory: glibc's thresholds raised once, mmap off (blocks above 32 MiB stay too) -----
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 2**30  # the heap's top goes back to the kernel only beyond 1 GiB free


def allocator_settings() -> list[str]:
    """The environment's own allocator settings, which win over ours."""
    env = os.environ
    names = [k for k in env if k.startswith("MALLOC_") and k.endswith("_")]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    if env.get("LD_PRELOAD"):
        names.append("LD_PRELOAD")
    return names


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's thresholds, once per process; False where nothing changed."""
    if not enabled("host_memory") or allocator_settings():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        and mallopt(M_MMAP_MAX, 0)
    )


# --- channels_last: the CPU's layout for nets, their inputs' gradients and fused groups --------
# torch is imported where used: the command line imports this module before anything else.
def channels_last(device) -> bool:
    return device.type == "cpu" and enabled("channels_last")


def to_channels_last(grad):
    import torch

    return grad.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _flatten_gradients_channels_last():
    """Flatten hands its gradient back in NCHW order, which makes a channels-last block's
    backward copy it twice; a process-wide hook for the duration (a net's own hooks would be
    pickled with a logged model) hands it back channels-last."""
    import torch

    def before_flatten(module, args):
        x = args[0] if args else None
        if (
            isinstance(module, torch.nn.Flatten)
            and isinstance(x, torch.Tensor)
            and x.requires_grad
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            x.register_hook(to_channels_last)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before_flatten)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def training(nets: list, device):
    """What a job enters around its training (either trainer, one net or a group): the collector
    back at its pace, and on the CPU the freed memory kept and the channels-last layout."""
    _restore_gc()
    if device.type != "cpu":
        yield
        return
    keep_freed_memory()
    if not channels_last(device):
        yield
        return
    import torch

    for net in nets:
        net.to(memory_format=torch.channels_last)
    with _flatten_gradients_channels_last():
        yield


# --- fast_exit --------------------------------------------------------------------------------
def leave(code) -> None:
    """Exit with `code` as sys.exit would, less the interpreter's teardown. What exiting must do
    is done first: atexit handlers, logging's flush, the streams' flush. While a thread that is
    not a daemon still runs, the exit is the ordinary one (it waits for that thread)."""
    if isinstance(code, str):
        sys.stderr.write(code + "\n")
    code = code if isinstance(code, int) else (0 if code is None else 1)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if not enabled("fast_exit") or any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    _run_atexit_handlers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _run_atexit_handlers() -> None:
    # Private: os._exit skips atexit handlers (MLflow's, Ray's, temporary directories'), and the
    # atexit module has no public call that runs them before exit; it goes with fast_exit.
    atexit._run_exitfuncs()
