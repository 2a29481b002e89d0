"""The management part of ``authz serve``: allocations in force, seen nodes, the API.

The overlay (allocations applied to checks) runs in every process whatever the flags:
an allocation made through any replica's API is in force on all of them. The API's
listener is optional (``--manage-address ""`` turns it off; with ``--workers N`` only
the first worker serves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from authz.clock import Clock
from authz.errors import AuthzError
from authz.ledger.base import Ledger
from authz.manage.api import ManageContext, build_app
from authz.manage.nodes import SeenNodes
from authz.manage.overlay import Overlay
from authz.manage.roles import ManageAuth
from authz.manage.server import ManageServer
from authz.manage.store import open_allocation_store
from authz.policy.store import PolicyStore
from authz.tls import TlsFiles

__all__ = ["Management"]

log = logging.getLogger("authz.manage")


class Management:
    def __init__(self, store: PolicyStore, ledger_url: str, state_dir: str, clock: Clock,
                 poll_s: float = 0.2,
                 audit: Callable[[str, dict[str, Any]], None] | None = None) -> None:  # fmt: skip
        try:
            allocations = open_allocation_store(ledger_url, state_dir)
        except ValueError as exc:
            raise AuthzError(f"allocation store: {exc}") from exc
        self.overlay = Overlay(allocations, poll_s)
        # A local store (memory, the sqlite file) is read before the first check; a Redis
        # one by the follower, at once but without holding up start-up: Redis may not
        # answer yet, and /readyz must say that about the ledger, not "not serving".
        self._local = ledger_url.partition("://")[0] in ("memory", "sqlite")
        self.seen = SeenNodes(allocations)
        self._store = store
        self._clock = clock
        self._auth = ManageAuth(clock)
        self._audit = audit
        self._server: ManageServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, ledger: Ledger, address: str, tls: TlsFiles | None) -> None:
        """Load the allocations (before the first check), follow them, serve the API."""
        if self._local:
            await self.overlay.refresh()
        self._tasks.append(asyncio.create_task(self.overlay.follow()))
        self._tasks.append(asyncio.create_task(self._flush_seen()))
        if address:
            ctx = ManageContext(self._store, ledger, self.overlay, self._auth, self._clock,
                                self._audit)
            self._server = ManageServer(build_app(ctx), tls)
            host, _, port = address.rpartition(":")
            await self._server.start(host.strip("[]") or "0.0.0.0", int(port))
            log.info("management API on %s", address)

    async def _flush_seen(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.seen.flush()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.seen.flush()
        await self._auth.aclose()
        await self.overlay.store.close()
