"""Python's cyclic garbage collector at a slower pace while a process starts.

Why: starting a run imports about 3,500 modules (torch, MLflow and its SQL store, pandas through
MLflow, Hydra, matplotlib) and builds about half a million objects that live until the process
exits. At Python's default pace (a collection every 700 new container objects, a full one every
100 of those) the collector walks that growing heap over and over: about 1,000 young collections
and 7 full ones, ~0.7-0.9 s of a 4.3 s tiny run on 2 cores, and none of it finds garbage worth
having. So the command line slows the pace before its first import, and the first training step
puts it back: the heap built so far is frozen (moved out of the collector's sight: modules,
classes and configs that live to the end anyway) and the default pace resumes, so later
collections walk only what the run itself makes. The price: garbage in reference cycles made
before the first step (once per process) is not collected until the process exits.

Collection is slowed, not switched off: a sweep's parent that only waits on its launcher's workers
(submitit, Ray) never trains and keeps the slower pace, still collecting. Whatever pace the process
had (Python's default, or a user's own from sitecustomize) is the one put back; a collector
switched off, or already at a slower pace, is left alone.
"""

from __future__ import annotations

import gc

START_UP_PACE = (50_000, 20, 100)  # young collections 70x rarer, full ones ~1,400x

_paused_from: tuple[int, ...] | None = None


def slow_down() -> bool:
    """Slow the collector for start-up (once; the command line calls it before its imports).
    False where it was off or already slower (0 < young threshold < ours), and is left so."""
    global _paused_from
    young = gc.get_threshold()[0]
    if _paused_from is not None or not gc.isenabled() or not 0 < young < START_UP_PACE[0]:
        return False
    _paused_from = gc.get_threshold()
    gc.set_threshold(*START_UP_PACE)
    return True


def started() -> None:
    """Training begins: freeze the start-up heap and collect at the usual pace again. Called by
    the trainers at every start; only the first after `slow_down` does anything."""
    global _paused_from
    if _paused_from is None:
        return
    gc.freeze()
    gc.set_threshold(*_paused_from)
    _paused_from = None
