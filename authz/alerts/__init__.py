"""Budget alerts: thresholds, predicted exhaustion, anomalies and cost variance.

engine = AlertEngine(lambda: store.current, ledger, clock, metrics,
                     sinks=[AlertEvents(otel.logger_provider), WebhookSender(...)])
enforcer = Enforcer(store, ledger, clock, observer=engine)   # notes who spent
await engine.tick()                                          # every few seconds
"""

from __future__ import annotations

from authz.alerts.engine import AlertEngine
from authz.alerts.events import AlertEvents
from authz.alerts.model import Alert, AlertSink
from authz.alerts.webhook import WebhookSender, sign

__all__ = ["Alert", "AlertEngine", "AlertEvents", "AlertSink", "WebhookSender", "sign"]
