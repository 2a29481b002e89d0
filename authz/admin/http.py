"""``/healthz`` (the process lives), ``/readyz`` (it takes checks), ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from authz.telemetry.metrics import Metrics

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        details: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._details = details  # extra /readyz fields, e.g. {"ledger": breaker snapshot}
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        self._app = app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        # Only stopping makes this 503. An open ledger breaker does not, whatever its mode:
        # every replica shares the one store, so failing readiness would take them all out
        # of the Service at once; Envoy would then answer 503 for every request (even in
        # fail_open or local_allowance), and a recovered store would wait for probes
        # again. The body says what is degraded, for operators and alerts.
        if self._ready():
            return web.json_response({"status": "ready", **self._details()})
        return web.json_response({"status": "not ready", **self._details()}, status=503)

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
