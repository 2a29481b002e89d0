"""Alerts as log lines, and as OpenTelemetry log events when OTel logs are configured."""

from __future__ import annotations

import logging
from typing import Any

from authz.alerts.model import Alert

__all__ = ["AlertEvents"]

log = logging.getLogger("authz.alerts")


def _attributes(alert: Alert) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in alert.payload().items():
        if key in ("type", "message"):
            continue
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, str | int | float | bool):
                    out[f"authz.alert.{key}.{k}"] = v
        elif value is not None:
            out[f"authz.alert.{key}"] = value
    return out


class AlertEvents:
    """A sink: one JSON log line per alert, and an OTel event (``authz.alert``) if on."""

    def __init__(self, logger_provider: Any = None) -> None:
        self._otel = logger_provider.get_logger("authz.alerts") if logger_provider else None

    def send(self, alert: Alert) -> None:
        log.warning(alert.message, extra={"alert": alert.payload()})
        if self._otel is None:
            return
        from opentelemetry._logs import LogRecord, SeverityNumber

        self._otel.emit(
            LogRecord(
                timestamp=int(alert.fired_at * 1e9),
                severity_number=SeverityNumber.WARN,
                severity_text="WARN",
                body=alert.message,
                event_name="authz.alert",
                attributes=_attributes(alert),
            )
        )
