"""The alert engine: watches budget usage off the request path and fires each alert once.

On the request path it is only an enforcer observer: :meth:`AlertEngine.decided` notes
which subjects spent (a dict insert). Every ``tick`` (the server calls it every few
seconds; tests call it after moving a fake clock) it reads the balance of each budget
counter those subjects touched, in this tick or the one before (a settlement lands after
its reservation), updates ``authz_budget_used_ratio`` and runs the rules of
:mod:`authz.alerts.rules`. An alert's id names its kind, budget, node and period: it
fires once, and again only in the next period.

Which counters are watched: those of budgets the policy's ``alerts:`` section selects
(by name and node level; org, department and team by default, not every user), and for
the gauge every budget above the user/app level. Rates are not budgets: never alerted.

Several service processes (``--workers``) each run an engine: with a shared ledger each
would fire the same alert; receivers dedupe on the delivery id (``x-authz-delivery``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from authz.admission import Unpriced, plan_limits
from authz.alerts.model import Alert, AlertSink
from authz.alerts.rules import (
    Series,
    Track,
    anomaly,
    cost_variance,
    exhausted,
    predicted,
    thresholds,
)
from authz.clock import Clock
from authz.decision import Decision, DenyReason
from authz.errors import LedgerError
from authz.ledger.base import Ledger, Limit
from authz.policy.model import LEAF_LEVELS, Node, Policy, SubjectPath
from authz.policy.periods import PeriodWindows
from authz.telemetry.metrics import Metrics

__all__ = ["AlertEngine"]

log = logging.getLogger("authz.alerts")
_MAX_TOUCHED = 100_000  # subjects noted between two ticks; beyond, the rest wait a tick


@dataclass(slots=True)
class _Watch:
    track: Track
    limit: Limit
    level: str
    alerting: bool
    gauge: bool


class AlertEngine:
    def __init__(
        self,
        policy: Callable[[], Policy],
        ledger: Ledger,
        clock: Clock,
        metrics: Metrics,
        sinks: Sequence[AlertSink] = (),
    ) -> None:
        self._policy = policy
        self._ledger = ledger
        self._clock = clock
        self._metrics = metrics
        self._sinks = tuple(sinks)
        Touched = dict[tuple[Node, ...], tuple[tuple[Node, ...], str | None]]
        self._touched: Touched = {}
        self._previous: Touched = {}
        self._leaves = False  # do alerts watch a user/app level? (refreshed every tick)
        self._refused: dict[tuple[str, str], int] = {}  # (budget, node) -> units left
        self._watches: dict[str, _Watch] = {}
        self._series: dict[tuple[str, str], Series] = {}
        self._fired: dict[str, float] = {}  # alert id -> its period's end
        self._windows: tuple[object, PeriodWindows] | None = None
        self.fired: list[Alert] = []  # the last tick's alerts (tests, logs)

    # ------------------------------------------------------------ the request path
    def decided(self, d: Decision) -> None:
        if d.subject is None or len(self._touched) >= _MAX_TOUCHED:
            return
        if d.allowed:
            if d.reservation_id is None:
                return
        elif d.reason is DenyReason.BUDGET_EXHAUSTED and d.quota is not None:
            self._refused[(d.quota.budget, d.quota.node)] = d.quota.remaining
        else:
            return
        nodes = d.subject.nodes
        if not self._leaves and nodes and nodes[-1].level in LEAF_LEVELS:
            # Nothing watches user/app budgets: 100k users of one department are one entry.
            nodes = nodes[:-1]
        self._touched[nodes] = (nodes, d.model)

    # ------------------------------------------------------------ the tick
    def _period_windows(self, policy: Policy) -> PeriodWindows:
        if self._windows is None or self._windows[0] is not policy.timezone:
            self._windows = (policy.timezone, PeriodWindows(policy.timezone))
        return self._windows[1]

    def _watch(self, policy: Policy, now: float) -> list[_Watch]:
        """The counters of subjects touched in this tick or the last one."""
        touched, self._touched = self._touched, {}
        subjects = {**self._previous, **touched}
        self._previous = touched
        windows = self._period_windows(policy)
        due: dict[str, _Watch] = {}
        self._leaves = policy.alerts.enabled and any(
            level in LEAF_LEVELS for level in policy.alerts.levels
        )
        for nodes, model in subjects.values():
            try:
                plan = plan_limits(policy, SubjectPath(nodes), model, windows, now)
            except Unpriced:
                continue
            for p in plan:
                b = p.budget
                if b is None:  # a rate, not a budget
                    continue
                key = p.limit.key
                w = self._watches.get(key)
                if w is None:
                    alerting = policy.alerts.enabled and policy.alerts.watches(b.name, b.level)
                    gauge = b.level not in LEAF_LEVELS
                    if not (alerting or gauge):
                        continue
                    start, end = windows.get(b.period, now)
                    unit = getattr(b, "unit", "tokens")
                    track = Track(key, b.name, p.limit.node, unit, b.tokens, start, end)
                    w = self._watches[key] = _Watch(track, p.limit, b.level, alerting, gauge)
                due[key] = w
        return list(due.values())

    async def tick(self) -> list[Alert]:
        """Read the touched counters, update the gauge, fire what is due. Never raises."""
        policy = self._policy()
        now = self._clock.now()
        self._expire(now)
        fired: list[Alert] = []
        for w in self._watch(policy, now):
            t = w.track
            try:
                balance = await self._ledger.balance(w.limit)
            except (LedgerError, OSError) as exc:
                log.warning("alerts: cannot read %s: %s", t.key, exc)
                continue
            t.observe(now, balance.used)
            t.refused = self._refused.pop((t.budget, t.node), t.refused)
            if w.gauge and t.nominal:
                self._metrics.budget_used.labels(t.budget, t.node).set(t.used / t.nominal)
            if w.alerting:
                fired.extend(self._rules(policy, w, now))
        for alert in fired:
            self._fire(alert)
        # What is left was noted for counters nobody watches (users, when alerts watch
        # only org/department/team): one entry per refused user, never read. Drop it.
        self._refused.clear()
        self.fired = fired
        return fired

    def _rules(self, policy: Policy, w: _Watch, now: float) -> list[Alert]:
        cfg = policy.alerts
        t = w.track
        out: list[Alert] = []
        crossed = [a for a in thresholds(t, cfg.thresholds, now) if a.id not in self._fired]
        if crossed:
            # Jumping past 50% and 80% at once sends the 80% alert only.
            for a in crossed[:-1]:
                self._fired[a.id] = t.end
            out.append(crossed[-1])
        candidates = [exhausted(t, now)]
        if cfg.predictive is not None:
            candidates.append(predicted(t, cfg.predictive, now))
        if cfg.cost_variance is not None:
            candidates.append(cost_variance(t, cfg.cost_variance, now, policy.pricing.currency))
        if cfg.anomaly is not None:
            rule = cfg.anomaly
            series = self._series.setdefault((t.budget, t.node), Series())
            series.observe(t.key, t.used, now, rule.bucket_s, rule.baseline_buckets + 1)
            candidates.append(anomaly(series, t, rule, now))
        out.extend(a for a in candidates if a is not None and a.id not in self._fired)
        return out

    def _fire(self, alert: Alert) -> None:
        self._fired[alert.id] = alert.period_end
        self._metrics.alerts.labels(alert.kind).inc()
        for sink in self._sinks:
            try:
                sink.send(alert)
            except Exception:
                log.exception("alert sink %s failed", type(sink).__name__)

    def _expire(self, now: float) -> None:
        """Forget finished periods: their alerts may fire again in the next one."""
        for key in [k for k, w in self._watches.items() if w.track.end <= now]:
            w = self._watches.pop(key)
            if w.gauge:
                with contextlib.suppress(KeyError):
                    self._metrics.budget_used.remove(w.track.budget, w.track.node)
        for alert_id in [a for a, end in self._fired.items() if end <= now]:
            del self._fired[alert_id]
