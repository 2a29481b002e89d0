"""Where allocations live: beside the ledger, in the same backend, chosen by its URL.

- ``memory://``: in this process (tests; gone at restart, as the memory ledger's usage);
- ``sqlite:///...``: a second SQLite file beside the ledger's (``<ledger>.manage.db``),
  so allocations survive a restart with the budgets they change;
- ``redis://``, ``rediss://``, ``redis+cluster://``: hashes beside the budgets
  (:mod:`authz.manage.store_redis`), shared by every replica.

Every store also keeps a *version* that changes on each write: replicas poll it (a
single GET) and reload the set only when it moved (:mod:`authz.manage.overlay`). The
store also remembers the nodes the service has seen (``GET /v1/nodes``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Protocol

from authz.manage.model import Allocation

__all__ = ["AllocationStore", "MemoryAllocationStore", "open_allocation_store"]

MAX_NODES = 100_000  # nodes remembered: a listing, not an index of every caller forever


class AllocationStore(Protocol):
    """Allocations and seen nodes. Errors are :class:`authz.errors.AuthzError`."""

    async def add(self, allocation: Allocation) -> None:
        """Store a new allocation (ids are random: never an existing one)."""
        ...

    async def remove(self, allocation_id: str) -> bool:
        """Drop an allocation; False if there was none."""
        ...

    async def all(self) -> tuple[Allocation, ...]:
        """Every stored allocation, expired ones included until purged."""
        ...

    async def version(self) -> str:
        """A token that differs after any add or remove (from any replica)."""
        ...

    async def purge(self, before: float) -> int:
        """Drop allocations that expired before ``before``; how many went."""
        ...

    async def note_nodes(self, nodes: Iterable[str]) -> None:
        """Remember node keys seen in decisions."""
        ...

    async def put_request(self, request_id: str, body: str) -> None:
        """Store (or replace) a quota request's JSON (authz/manage/requests.py)."""
        ...

    async def requests(self) -> tuple[str, ...]:
        """Every stored quota request's JSON."""
        ...

    async def nodes(self) -> frozenset[str]:
        """The node keys remembered."""
        ...

    async def close(self) -> None: ...


class MemoryAllocationStore:
    def __init__(self) -> None:
        self._items: dict[str, Allocation] = {}
        self._nodes: set[str] = set()
        self._requests: dict[str, str] = {}
        self._version = itertools.count(1)
        self._current = 0

    def _bump(self) -> None:
        self._current = next(self._version)

    async def add(self, allocation: Allocation) -> None:
        self._items[allocation.id] = allocation
        self._bump()

    async def remove(self, allocation_id: str) -> bool:
        gone = self._items.pop(allocation_id, None) is not None
        if gone:
            self._bump()
        return gone

    async def all(self) -> tuple[Allocation, ...]:
        return tuple(self._items.values())

    async def version(self) -> str:
        return str(self._current)

    async def purge(self, before: float) -> int:
        old = [a.id for a in self._items.values() if a.expires_at is not None
               and a.expires_at < before]  # fmt: skip
        for key in old:
            del self._items[key]
        if old:
            self._bump()
        return len(old)

    async def note_nodes(self, nodes: Iterable[str]) -> None:
        for node in nodes:
            if len(self._nodes) >= MAX_NODES:
                break
            self._nodes.add(node)

    async def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    async def put_request(self, request_id: str, body: str) -> None:
        self._requests[request_id] = body

    async def requests(self) -> tuple[str, ...]:
        return tuple(self._requests.values())

    async def close(self) -> None:
        return None


def open_allocation_store(ledger_url: str, state_dir: str = ".") -> AllocationStore:
    """The store for a ledger URL (``ValueError`` for one it cannot serve)."""
    scheme = ledger_url.partition("://")[0]
    if scheme == "memory":
        return MemoryAllocationStore()
    if scheme == "sqlite":
        from authz.ledger.sqlite import parse_sqlite_url
        from authz.manage.store_sqlite import SqliteAllocationStore

        path = str(parse_sqlite_url(ledger_url, state_dir).path) + ".manage.db"
        return SqliteAllocationStore(path)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from authz.manage.store_redis import RedisAllocationStore

        return RedisAllocationStore(ledger_url)
    raise ValueError(f"no allocation store for ledger URL scheme {scheme}://")
