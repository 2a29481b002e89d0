"""Giving memory back to the operating system after a large reclaim (issue 9, #7).

Forgetting idle callers (``Enforcer.forget_idle``, the memory ledger's pruning) frees
their objects inside the process, but CPython rarely returns that memory:

- pymalloc carves small objects out of 1 MiB arenas and returns an arena only when
  every object in it is gone. Memo entries of 200k callers filled ~20 new arenas, and
  the few long-lived objects made meanwhile (a counter's new value, a memo's key, a
  reservation left open by a client gone before its response) pinned nearly all of
  them: +28% RSS after the callers left. So callers seen once get no memo entry at all
  (:class:`authz.recent.Doorkeeper`); what a one-off caller still leaves (its minute
  rate counter, its settled id) is small and follows the request rate, so few arenas
  are filled. Still the burst's live set (the minute rate counters of its last callers)
  outgrew the arenas and a few survivors pinned the new ones (+14-17%), so the service
  runs on glibc malloc (authz.allocator), which this trim returns page by page;
- glibc keeps freed pages until ``malloc_trim``; and the interpreter's free lists and
  any cyclic garbage keep objects until a full ``gc.collect()``.

Figures (``python -m bench memory --idle``): docs/performance.md. The collection and
trim take tens of ms on the event loop, so they run only after a sweep forgot (or its
memos turned away) at least :data:`RECLAIM_AT` entries, at most once per memo rotation
(a minute), and once more :data:`TAIL_S` later, never per check. On anything but glibc
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import Callable

__all__ = ["RECLAIM_AT", "can_trim", "release_memory"]

log = logging.getLogger("authz.reclaim")

# Entries forgotten in one sweep from which a trim is worth its few milliseconds.
RECLAIM_AT = 10_000
# After such a sweep, one more trim this much later: the ledger's minute windows and
# settled ids (kept a minute) of the last callers go after the memos that named them.
TAIL_S = 150.0
_again_at: float | None = None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def can_trim() -> bool:
    """True on glibc, whose ``malloc_trim`` hands freed heap pages back to the OS."""
    return _malloc_trim() is not None


def release_memory(forgotten: int, now: float | None = None) -> bool:
    """After ``forgotten`` entries were dropped: hand freed heap pages back to the OS
    (glibc ``malloc_trim(0)``) if that many are worth it, and once more :data:`TAIL_S`
    later. True if a trim ran."""
    global _again_at
    trim = _malloc_trim()
    if trim is None:
        return False
    now = time.monotonic() if now is None else now
    if forgotten >= RECLAIM_AT:
        _again_at = now + TAIL_S
    elif _again_at is not None and now >= _again_at:
        _again_at = None
    else:
        return False
    start = time.perf_counter()
    gc.collect()  # also empties the interpreter's free lists, which hold freed objects
    trim(0)
    log.info(
        "forgot %d idle entries; returned freed memory to the OS in %.1f ms",
        forgotten,
        (time.perf_counter() - start) * 1000,
    )
    return True
