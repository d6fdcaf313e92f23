"""Training on the CPU keeps the host memory it frees (glibc's malloc) instead of handing it back
to the kernel after every step.

Why: a step frees and reallocates the same activations and gradients. glibc returns large freed
blocks to the kernel (those above its mmap threshold, and the top of the heap beyond its trim
threshold); its thresholds grow with the blocks it sees, but only up to twice the largest block,
so a step whose activations total more than that (a fused group: 4 members at batch 256 free
~75 MB a step) has the kernel zero-fill every page again on the next step: 17-19 k page faults a
step, about half of its time on 2 cores. With the thresholds raised once, none. A block above
32 MiB, the largest mmap threshold glibc accepts, was still mapped and unmapped at every use (a
group of 8 at batch 256: its first activations are 38 MB; 20 k trial-examples/s against 26-27 k
with 4 members), so mmap is off too: such blocks come from the heap and stay there. The numbers
are the same; only where the memory comes from changes. The cost: the process keeps its peak
heap until it exits.

A user's own allocator settings win: with glibc's MALLOC_*_ variables or malloc tunables, or an
LD_PRELOAD (jemalloc, tcmalloc) in the environment, nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit: blocks up to 32 MiB stay
TRIM_THRESHOLD = 2**30  # the heap's top goes back to the kernel only beyond 1 GiB free


def user_settings() -> list[str]:
    """The names of the environment's allocator settings (which this module leaves alone)."""
    env = os.environ
    names = [k for k in env if k.startswith("MALLOC_") and k.endswith("_")]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    if env.get("LD_PRELOAD"):
        names.append("LD_PRELOAD")
    return names


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's thresholds, once per process; False where nothing changed (another C
    library, or the user's own settings)."""
    if user_settings():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc (macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and
                mallopt(M_MMAP_MAX, 0))  # fmt: skip
