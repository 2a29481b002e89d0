"""The alert rules, as pure functions of what was observed about one budget counter.

Inputs are :class:`Track` (one budget, one node, one period: its settled usage over
time) and :class:`Series` (one budget and node across periods: usage per bucket, for
the anomaly rule). Nothing here does I/O or reads a clock: the engine passes ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from authz.alerts.model import Alert
from authz.policy.observability import AnomalyRule, CostVarianceRule, PredictiveRule

__all__ = ["Series", "Track", "anomaly", "cost_variance", "exhausted", "predicted", "thresholds"]


@dataclass
class Track:
    key: str  # the ledger counter's key: budget, node and period start
    budget: str
    node: str
    unit: str
    nominal: int  # the budget's amount (soft grace and burst not included)
    start: float
    end: float
    used: int = 0
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=512))
    refused: int | None = None  # units left when a request was last refused here

    def observe(self, now: float, used: int) -> None:
        self.used = used
        if not self.samples or self.samples[-1][1] != used or now - self.samples[-1][0] > 60:
            self.samples.append((now, used))

    def alert(self, kind: str, now: float, message: str, **extra: object) -> Alert:
        threshold = extra.pop("threshold", None)
        suffix = f"{threshold}:" if threshold is not None else ""
        return Alert(
            id=f"{kind}:{suffix}{self.key}",
            kind=kind,
            budget=self.budget,
            node=self.node,
            unit=self.unit,
            used=self.used,
            amount=self.nominal,
            period_start=self.start,
            period_end=self.end,
            fired_at=now,
            message=message,
            threshold=threshold if isinstance(threshold, int) else None,
            details=dict(extra),
        )


def _span(seconds: float) -> str:
    h, rest = divmod(max(0, int(seconds)), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m"


def thresholds(t: Track, percents: tuple[int, ...], now: float) -> list[Alert]:
    """Each threshold the settled usage has reached; the caller fires each id once."""
    if t.nominal <= 0:
        return []
    out = []
    for p in percents:
        if t.used * 100 >= p * t.nominal:
            msg = (
                f"Budget '{t.budget}' for {t.node} has used {100 * t.used / t.nominal:.0f}% "
                f"({t.used} of {t.nominal}); the period ends in {_span(t.end - now)}."
            )
            out.append(t.alert("threshold", now, msg, threshold=p))
    return out


def exhausted(t: Track, now: float) -> Alert | None:
    """A request was refused on this budget: it is out, for the rest of the period."""
    if t.refused is None:
        return None
    msg = (
        f"Budget '{t.budget}' for {t.node} is refusing requests ({t.refused} of {t.nominal} "
        f"left); it resets in {_span(t.end - now)}."
    )
    return t.alert("exhausted", now, msg, remaining=t.refused)


def burn_rate(t: Track, lookback_s: float, now: float) -> float | None:
    """Units per second over about the last ``lookback_s`` (the period start counts as 0)."""
    points = [(t.start, 0), *((ts, u) for ts, u in t.samples if t.start <= ts <= now)]
    recent = [p for p in points if p[0] >= now - lookback_s]
    older = [p for p in points if p[0] < now - lookback_s]
    ref = recent[0] if recent and now - recent[0][0] >= 60 else (older[-1] if older else None)
    if ref is None or now - ref[0] < 60:
        return None
    return max(0.0, (t.used - ref[1]) / (now - ref[0]))


def predicted(t: Track, rule: PredictiveRule, now: float) -> Alert | None:
    """The recent burn rate empties the budget before the period ends."""
    length = t.end - t.start
    if length <= 0 or t.used >= t.nominal or (now - t.start) / length < rule.min_elapsed:
        return None
    rate = burn_rate(t, rule.lookback_s, now)
    if not rate:
        return None
    runs_out = now + (t.nominal - t.used) / rate
    if runs_out >= t.end:
        return None
    msg = (
        f"Budget '{t.budget}' for {t.node} will run out in about {_span(runs_out - now)} at the "
        f"current rate ({rate * 3600:.0f} per hour), {_span(t.end - runs_out)} before its "
        f"period ends; {t.used} of {t.nominal} used."
    )
    return t.alert(
        "predicted_exhaustion", now, msg, rate_per_hour=round(rate * 3600, 1),
        runs_out_in_s=round(runs_out - now), runs_out_at=round(runs_out),
    )  # fmt: skip


def cost_variance(t: Track, rule: CostVarianceRule, now: float, currency: str) -> Alert | None:
    """Cost budgets: spend so far runs ``percent`` ahead of the even-pace plan."""
    length = t.end - t.start
    if t.unit != "cost" or length <= 0:
        return None
    share = (now - t.start) / length
    if share < rule.min_elapsed:
        return None
    plan = t.nominal * share
    if plan <= 0 or t.used <= plan * (1 + rule.percent / 100):
        return None
    ahead = 100 * (t.used / plan - 1)
    msg = (
        f"Cost budget '{t.budget}' for {t.node}: {t.used / 1e6:.2f} {currency} spent, "
        f"{ahead:.0f}% above the even-pace plan of {plan / 1e6:.2f} {currency} at "
        f"{100 * share:.0f}% of the period."
    )
    return t.alert(
        "cost_variance", now, msg, variance_percent=round(ahead, 1),
        plan=round(plan), currency=currency,
    )  # fmt: skip


@dataclass
class Series:
    """Usage of one budget on one node per bucket, across periods (the node's baseline)."""

    last_key: str = ""
    last_used: int = 0
    first_bucket: int | None = None
    buckets: dict[int, int] = field(default_factory=dict)

    def observe(self, key: str, used: int, now: float, bucket_s: float, keep: int) -> None:
        delta = used - self.last_used if key == self.last_key else used
        self.last_key, self.last_used = key, used
        b = math.floor(now / bucket_s)
        if self.first_bucket is None:
            self.first_bucket = b
        self.buckets[b] = self.buckets.get(b, 0) + max(0, delta)
        for old in [k for k in self.buckets if k < b - keep]:
            del self.buckets[old]


def anomaly(s: Series, t: Track, rule: AnomalyRule, now: float) -> Alert | None:
    """This bucket's usage is ``factor`` x the average of the node's previous buckets."""
    if s.first_bucket is None:
        return None
    b = math.floor(now / rule.bucket_s)
    history = min(rule.baseline_buckets, b - s.first_bucket)
    if history < rule.min_history:
        return None
    baseline = sum(s.buckets.get(i, 0) for i in range(b - history, b)) / history
    current = s.buckets.get(b, 0)
    if current < rule.min_units or current < rule.factor * baseline:
        return None
    times = f"{current / baseline:.1f}x" if baseline else "far above"
    msg = (
        f"Usage of '{t.budget}' by {t.node} is {times} its own recent average: {current} in the "
        f"last {_span(rule.bucket_s)} vs {baseline:.0f} per {_span(rule.bucket_s)} over the "
        f"previous {history}."
    )
    return t.alert(
        "anomaly", now, msg, bucket_units=current, baseline_units=round(baseline, 1),
        factor=rule.factor,
    )  # fmt: skip
