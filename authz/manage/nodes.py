"""Nodes seen in decisions, remembered in the allocation store for ``GET /v1/nodes``.

An observer (authz/observer.py): ``decided`` runs on the request path, so it only adds
the caller's path to a set; :meth:`SeenNodes.flush` (a server task, once a second)
writes the nodes not written before. The "already written" memory is bounded: after
:data:`MAX_LOCAL` nodes it starts over, costing at most a repeated (idempotent) write.
"""

from __future__ import annotations

import logging

from authz.decision import Decision
from authz.manage.store import AllocationStore

__all__ = ["SeenNodes"]

log = logging.getLogger("authz.manage")
MAX_LOCAL = 50_000


class SeenNodes:
    def __init__(self, store: AllocationStore) -> None:
        self._store = store
        self._pending: set[str] = set()
        self._written: set[str] = set()

    def decided(self, decision: Decision) -> None:
        subject = decision.subject
        if subject is None:
            return
        key = str(subject)
        if key not in self._written and len(self._pending) < MAX_LOCAL:
            self._pending.add(key)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, set()
        if len(self._written) > MAX_LOCAL:
            self._written.clear()
        try:
            await self._store.note_nodes(sorted(batch))
        except Exception as exc:  # a listing, not a budget: say it, try again later
            log.warning("could not record seen nodes: %s", exc)
            self._pending |= batch
            return
        self._written |= batch
