"""SDK clients a test closes when it ends, passed or failed: ``closing(openai.OpenAI(...))``.

An ``openai.OpenAI`` or ``anthropic.Anthropic`` left open keeps its pooled keep-alive
socket. The SDK client sits in a reference cycle (its resources point back at it), so
only the cyclic GC frees it, during some later test, and the socket's finalizer can run
before the client's own ``close``: a ResourceWarning, an error in this suite, blamed on
a test that has nothing to do with it (seen on a busy machine, after a failed request
kept its client alive in the traceback). The autouse fixture ``close_sdk_clients``
(tests/conftest.py) closes every client registered here at the end of each test.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, TypeVar

__all__ = ["close_all", "closing"]


class _Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closeable)
_OPEN: list[_Closeable] = []


def closing(client: C) -> C:
    """Register ``client`` to be closed when the current test ends; returns it."""
    _OPEN.append(client)
    return client


def close_all() -> None:
    while _OPEN:
        with contextlib.suppress(Exception):
            _OPEN.pop().close()
