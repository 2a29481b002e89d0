"""``/healthz`` (the process lives), ``/readyz`` (it takes checks), ``/metrics``.

This port must not be reachable beyond the cluster network: it needs no credential.
It listens on loopback unless given an address (``--http-address``); Kubernetes probes
reach the pod directly, so no Service has to expose it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from aiohttp import web

from authz.errors import AddressInUse, AuthzError
from authz.telemetry.metrics import Metrics

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(
        self,
        metrics: Metrics,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness  # (ready, body): authz.readiness.Readiness.state
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        self._app = app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        # 503 while stopping, until the ledger has answered once, and while the breaker
        # is open in fail_closed mode (every check would be 503 anyway); an open breaker
        # in fail_open/local_allowance is 200 "degraded", since failing it would take
        # every replica sharing the store out at once. The reasoning is in
        # authz/readiness.py; the body always carries the ledger's state.
        ready, body = self._readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"the admin HTTP address {where} is already in use") from None
            raise AuthzError(f"cannot listen on the admin HTTP address {where}: {exc}") from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
