"""Wiring of everything that watches the service: OTel, tracing, audit, alerts.

Kept out of :mod:`authz.server` so the server only says *when* (start, every few
seconds, stop) and this module says *what*:

- OpenTelemetry from ``OTEL_*`` (:mod:`authz.telemetry.otel`): nothing when unset;
- tracing: a :class:`Tracing` for the servicers and the ledger wrapped so its calls are
  child spans (both ``None``/untouched when tracing is off);
- the audit trail and the alert engine, both told of decisions through one enforcer
  observer, and both driven by the policy's ``audit:`` / ``alerts:`` sections (read at
  every event, so a reload turns them on or off);
- alert sinks: a log line and an OTel log event per alert, and the policy's webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from authz.alerts import AlertEngine, AlertEvents, WebhookSender
from authz.audit import AuditTrail
from authz.clock import Clock
from authz.errors import PolicyError
from authz.ledger.base import Ledger
from authz.observer import Observers
from authz.policy.model import Policy
from authz.policy.store import PolicyStore
from authz.telemetry.metrics import Metrics
from authz.telemetry.otel import OtelSetup, start_otel
from authz.telemetry.otel_metrics import bridge_to_otel
from authz.telemetry.tracing import TracedLedger, Tracing

__all__ = ["Observability"]

log = logging.getLogger("authz.observability")


class Observability:
    def __init__(
        self,
        store: PolicyStore,
        ledger_url: str,
        clock: Clock,
        metrics: Metrics,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self._store = store
        self._metrics = metrics
        try:
            self.otel = start_otel(env)
        except ValueError as exc:  # a typo in OTEL_* must not stop the gateway
            log.error("OpenTelemetry off: %s", exc)
            self.otel = OtelSetup()
        self.tracing = Tracing(self.otel.tracer) if self.otel.tracer is not None else None
        if self.otel.meter_provider is not None:
            bridge_to_otel(metrics.registry, self.otel.meter_provider)
        self.audit = AuditTrail(store.current, ledger_url, clock, metrics)
        self.webhooks = WebhookSender(lambda: store.current.alerts.webhooks, clock, metrics, env)
        self._events = AlertEvents(self.otel.logger_provider)
        self._clock = clock
        self.alerts: AlertEngine | None = None
        self.observer = Observers([self.audit, self])
        self.alert_interval_s = float(env.get("AUTHZ_ALERT_INTERVAL_S", "5"))
        self.decision_log = env.get("AUTHZ_DECISION_LOG", "denials")
        store.on_change(self._reloaded)
        store.on_failure(self._reload_failed)
        self._tasks: list[asyncio.Task[None]] = []

    # The alert engine needs the ledger, which needs wrapping first: bound in `ledger()`.
    def decided(self, decision: Any) -> None:
        if self.alerts is not None:
            self.alerts.decided(decision)

    def ledger(self, ledger: Ledger) -> Ledger:
        """The ledger the enforcer should use (wrapped for child spans if tracing is on)."""
        self.alerts = AlertEngine(
            lambda: self._store.current,
            ledger,
            self._clock,
            self._metrics,
            sinks=[self._events, self.webhooks],
        )
        # Edge leases (authz.ledger.lease) report each check as decided "local" or by a
        # "redis" round trip; find them under the breaker and count into the metric.
        layer: Any = ledger
        for _ in range(4):
            if layer is None:
                break
            if hasattr(layer, "on_check") and layer.on_check is None:
                layer.on_check = lambda where: self._metrics.lease_decisions.labels(where).inc()
                break
            layer = getattr(layer, "inner", None)
        if self.tracing is None:
            return ledger
        return TracedLedger(ledger, self.tracing.tracer)  # type: ignore[return-value]

    def _reloaded(self, policy: Policy) -> None:
        self.audit.reloaded(policy)

    def _reload_failed(self, error: PolicyError) -> None:
        self.audit.reload_failed(error)

    def start(self) -> None:
        self.audit.start()
        self.audit.started()
        self._tasks.append(asyncio.get_running_loop().create_task(self._alert_loop()))

    async def _alert_loop(self) -> None:
        while True:
            await asyncio.sleep(self.alert_interval_s)
            if self.alerts is not None:
                try:
                    await self.alerts.tick()
                except Exception:
                    log.exception("alert tick failed")

    async def close(self) -> None:
        """After the last check: a final alert tick, flush audit and deliveries, flush OTel."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.alerts is not None:
            with contextlib.suppress(Exception):
                await self.alerts.tick()
        await self.audit.close()
        await self.webhooks.close()
        await asyncio.to_thread(self.otel.shutdown)
