"""CPU-bound parsing of big bodies, off the event loop that serves every tenant's checks.

Parsing JSON in Python costs tens of milliseconds per MiB when the body is many small
objects; on the loop, one such body delays every other Check and stream by as much
(issue 9: 374 ms for 4 MB, past Envoy's 250 ms ext_authz timeout). Big bodies go to a
small thread pool instead.

Why threads, though the GIL still serialises Python code: a thread that holds the GIL
is asked to give it up every ``sys.getswitchinterval()`` (5 ms) when the loop thread
wants it, so the loop runs at most a few ms late instead of for the whole parse; the
parse itself gets slower by about the time the loop takes. A process pool would run in
parallel, but would copy every body to another process and hold a second interpreter's
memory per worker, for work that takes tens of ms. Two workers: at most two big bodies
are parsed at a time, the rest wait their turn off the loop instead of piling on.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["INLINE_BYTES", "run_off_loop"]

P = ParamSpec("P")
T = TypeVar("T")

# Bodies up to this size are parsed inline: ~1-2 ms at worst, less than a thread hop
# costs in latency for the common small request.
INLINE_BYTES = 64 * 1024

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="authz-parse")
    return _pool


async def run_off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in the parse pool; exceptions propagate as raised."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))
