"""SDK clients a test closes when it ends, passed or failed: ``closing(openai.OpenAI(...))``.

Each test closes the sockets it opened (warnings are errors: a ResourceWarning fails
whichever test the garbage collector happens to run in). A plain ``httpx.Client`` (e.g.
``openai.DefaultHttpxClient()`` shared by a burst) has no finalizer that closes it: left
open by a failed request, its pooled sockets warn in a later, unrelated test (issue 10,
reproduced with PYTHONTRACEMALLOC: allocated in the burst's ``create``). The SDK
clients do close themselves when collected, but a failed test's traceback keeps them,
and their keep-alive sockets, alive into later tests. The autouse fixture
``close_sdk_clients`` (tests/conftest.py) closes every client registered here at the
end of each test, so its sockets end with it.
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
