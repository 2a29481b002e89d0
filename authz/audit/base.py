"""The audit log contract: append to the chain, read it back in order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from authz.audit.chain import Entry

__all__ = ["AuditLog"]


class AuditLog(Protocol):
    """An append-only, hash-chained log. Safe with several writers (processes) at once."""

    async def append(self, kind: str, data: Mapping[str, Any], ts: float) -> Entry:
        """Chain one entry after the current head and store it; return it."""
        ...

    def stored(self) -> AsyncIterator[tuple[str, bytes]]:
        """Every stored entry in order, as (location, raw JSON), for verify and export."""
        ...

    async def head(self) -> str | None:
        """The head hash the store recorded apart from the entries, if it keeps one."""
        ...

    async def close(self) -> None: ...
