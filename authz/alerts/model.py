"""Alert values and where they go."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = ["Alert", "AlertSink"]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert about one budget on one node in one period.

    ``id`` is stable for that (kind, threshold, budget, node, period): it is the
    webhook's delivery id, so a receiver can drop a duplicate after a retry.
    """

    id: str
    kind: str  # "threshold" | "exhausted" | "predicted_exhaustion" | "anomaly" | "cost_variance"
    budget: str
    node: str
    unit: str  # "tokens" (weighted units) or "cost" (micro-units of the currency)
    used: int
    amount: int
    period_start: float
    period_end: float
    fired_at: float
    message: str
    threshold: int | None = None  # percent, for kind "threshold"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def org(self) -> str:
        first = self.node.split("/", 1)[0]
        return first.partition(":")[2]

    def payload(self) -> dict[str, Any]:
        """The webhook body (and the OTel event's attributes)."""
        return {
            "type": "authz.alert",
            "id": self.id,
            "kind": self.kind,
            "budget": self.budget,
            "node": self.node,
            "org": self.org,
            "unit": self.unit,
            "used": self.used,
            "amount": self.amount,
            "percent": round(100.0 * self.used / self.amount, 1) if self.amount else None,
            "threshold": self.threshold,
            "period_start": _iso(self.period_start),
            "period_end": _iso(self.period_end),
            "fired_at": _iso(self.fired_at),
            "message": self.message,
            "details": self.details,
        }


class AlertSink(Protocol):
    def send(self, alert: Alert) -> None:
        """Take one alert; must not block (deliver in the background)."""
        ...
