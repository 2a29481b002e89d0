"""``authz serve`` runs on glibc's malloc, not CPython's pymalloc (issue 9, #7).

Memory must follow activity, not history: after 200k distinct callers once each and an
idle, RSS back within 10% of what it was before them. With pymalloc it was not (+14% to
+17%, ``python -m bench memory --idle``, docs/performance.md "Memory"), and no amount
of forgetting fixes that: pymalloc carves objects out of 1 MiB arenas and hands an
arena back only when every object in it is gone. The burst's live set (each caller's
minute rate counter: ~300 bytes for every caller of the last minute or two) outgrows the
arenas the service had and fills new ones, and anything made meanwhile that lives on
(a metric's new value, a budget counter's new total: one per arena is enough) keeps
them.
Measured in the service (gdb, ``_PyObject_DebugMallocStats``): 30 arenas before 60k
callers, 42 at the peak and still 42 after the idle, with fewer live bytes than before.
glibc's malloc frees by the 4 KiB page (``malloc_trim``, authz.reclaim), so the same
objects pin a page each, not a MiB.

``PYTHONMALLOC`` is read once, when the interpreter starts, so the command re-executes
itself once with it set: early, before the service allocates anything, and only for a
real command line (``main()`` from the console script or ``python -m authz``), never
for ``main([...])`` called in a process that is already running (tests). Set
``PYTHONMALLOC`` yourself to keep any other allocator: ``PYTHONMALLOC=pymalloc`` is the
opt-out (a few % less CPU per check, see docs/performance.md). Not on a libc without
``malloc_trim`` (musl, macOS), where the trade was not measured.
"""

from __future__ import annotations

import os
import sys

from authz.reclaim import can_trim

__all__ = ["ALLOCATOR", "VARIABLE", "reexec_with_malloc"]

VARIABLE = "PYTHONMALLOC"
ALLOCATOR = "malloc"


def reexec_with_malloc() -> None:
    """Replace this process by the same command with ``PYTHONMALLOC=malloc``, unless the
    variable is set already (by us, one exec ago, or by whoever started us) or there is
    no ``malloc_trim`` to hand freed pages back. Returns only if it did not re-execute."""
    if VARIABLE in os.environ or not can_trim():
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execve(sys.executable, argv, {**os.environ, VARIABLE: ALLOCATOR})
    except OSError as exc:  # the interpreter cannot be run again: serve as we are
        print(f"authz: could not restart with {VARIABLE}={ALLOCATOR} ({exc}): serving on"
              " pymalloc", file=sys.stderr)  # fmt: skip
