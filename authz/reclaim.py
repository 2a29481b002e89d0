"""Giving memory back to the operating system after a large reclaim (issue 9, #7).

Forgetting idle callers (``Enforcer.forget_idle``, the memory ledger's pruning) frees
their objects inside the process, but CPython rarely returns that memory:

- pymalloc carves small objects out of 1 MiB arenas and returns an arena only when
  every object in it is gone; after 200k callers came and went, a few long-lived
  objects pinned most arenas. Running on glibc's malloc (``PYTHONMALLOC=malloc`` in the
  service's environment) lets a trim give them back, at ~10-15% more CPU per check
  (measured in process, best of five: 80 -> 94 us per check and settle). That is a
  cost on every request for memory that is bounded either way (the arenas are reused
  by the next callers, not added to), so it is the operator's choice, not the default;
- glibc keeps freed pages until ``malloc_trim``; and the interpreter's free lists and
  any cyclic garbage keep objects until a full ``gc.collect()``.

Measured with ``python -m bench memory --idle`` (200k users once each, then idle): with
pymalloc and a trim, 83 -> 122 -> 117 MB (+40%); with glibc malloc, collection and trim,
see docs/performance.md. The collection and trim take tens of ms on the event loop, so
they run only after a sweep forgot at least :data:`RECLAIM_AT` entries (at most once per
memo rotation, a minute), never per check. On anything but glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import Callable

__all__ = ["RECLAIM_AT", "release_memory"]

log = logging.getLogger("authz.reclaim")

# Entries forgotten in one sweep from which a trim is worth its few milliseconds.
RECLAIM_AT = 10_000


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


def release_memory(forgotten: int) -> bool:
    """After ``forgotten`` entries were dropped: hand freed heap pages back to the OS
    (glibc ``malloc_trim(0)``) if that many are worth it. True if a trim ran."""
    trim = _malloc_trim()
    if forgotten < RECLAIM_AT or trim is None:
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
