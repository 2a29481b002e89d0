"""Prometheus metrics (``/metrics``). Every label is bounded.

Labels are the verdict, the deny reason, the org, the department, the model *rule* that
matched (``gpt-4o*``, or ``other``: never the raw string a client sent), a budget name
and a node above the leaf (``org:acme/department:research``). Never a user, an app, a
team member or a reservation id: those belong in traces and logs.

Some metrics are fed by other parts of the service as they land: the queue by admission
control, the breaker state and the lease share by the Redis ledger. They are declared
here so the dashboard and the alert rules in ``docs/observability/`` have one catalogue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from authz.decision import Decision
from authz.directory.stats import DirectoryStats
from authz.ledger.circuit import BreakerSnapshot
from authz.policy.model import SubjectPath
from authz.telemetry.directory_metrics import DIRECTORY_METRIC_NAMES, DirectoryCollector
from authz.usage.types import TokenUsage

__all__ = ["METRIC_NAMES", "Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# What /metrics exposes (counters with their _total suffix), for docs and tests.
METRIC_NAMES = (
    "authz_decisions_total",
    "authz_check_seconds",
    "authz_settle_seconds",
    "authz_settlements_total",
    "authz_settle_refused_total",
    "authz_settlement_bounds_total",
    "authz_tokens_total",
    "authz_cost_total",
    "authz_reservations_expired_total",
    "authz_policy_reload_failures",
    "authz_budget_used_ratio",
    "authz_queue_depth",
    "authz_queue_wait_seconds",
    "authz_ledger_breaker_state",
    "authz_journal_entries",
    "authz_journal_replays_total",
    "authz_journal_replayed_entries_total",
    "authz_lease_decisions_total",
    "authz_audit_entries_total",
    "authz_audit_failures_total",
    "authz_alerts_total",
    "authz_alert_deliveries_total",
    *DIRECTORY_METRIC_NAMES,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "authz_decisions",
            "Check decisions by verdict, reason, org, department and model rule",
            ["verdict", "reason", "org", "department", "model"],
            registry=r,
        )
        self.check_seconds = Histogram(
            "authz_check_seconds", "Time to decide a Check", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.settle_seconds = Histogram(
            "authz_settle_seconds",
            "Time to settle a reservation in the ledger",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.settlements = Counter(
            "authz_settlements", "Reservations settled", ["outcome"], registry=r
        )
        self.settle_refused = Counter(
            "authz_settle_refused",
            "Settlements refused because the reservation handle did not verify (a forged"
            " stream, or replicas signing with different keys), by reason",
            ["reason"],
            registry=r,
        )
        self.settlement_bounds = Counter(
            "authz_settlement_bounds",
            "Settlements that did not charge what the upstream reported, by reason:"
            " usage_above_bound (clamped), decoded_too_large or encoding_unsupported"
            " (body not read: the reservation was charged)",
            ["reason"],
            registry=r,
        )
        self.tokens = Counter(
            "authz_tokens",
            "Tokens settled from real usage",
            ["org", "department", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "authz_cost",
            "Cost of settled usage at the policy's prices (models with a price only)",
            ["org", "department", "model", "currency"],
            registry=r,
        )
        self.expired = Counter(
            "authz_reservations_expired", "Reservations never settled", registry=r
        )
        self.reload_failures = Gauge(
            "authz_policy_reload_failures", "Failed policy reloads", registry=r
        )
        self.budget_used = Gauge(
            "authz_budget_used_ratio",
            "Share of a budget used in its current period (settled usage / amount), "
            "for nodes above the user/app level",
            ["budget", "node"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "authz_queue_depth", "Checks waiting in the admission queue", registry=r
        )
        self.queue_wait = Histogram(
            "authz_queue_wait_seconds",
            "How long a queued Check waited",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "authz_ledger_breaker_state",
            "The ledger's circuit breaker: 0 closed, 1 half-open, 2 open",
            registry=r,
        )
        self.journal_entries = Gauge(
            "authz_journal_entries",
            "Usage entries in the local journal, waiting to be replayed to the ledger",
            registry=r,
        )
        self.lease_decisions = Counter(
            "authz_lease_decisions",
            "Checks decided from a local lease vs by a ledger round trip",
            ["where"],
            registry=r,
        )
        self.audit_entries = Counter(
            "authz_audit_entries", "Entries appended to the audit chain", ["kind"], registry=r
        )
        self.audit_failures = Counter(
            "authz_audit_failures",
            "Audit entries that could not be written (store down, queue full)",
            registry=r,
        )
        self.alerts = Counter("authz_alerts", "Alerts fired", ["kind"], registry=r)
        self.alert_deliveries = Counter(
            "authz_alert_deliveries",
            "Webhook delivery attempts by outcome (ok, retry, failed)",
            ["outcome"],
            registry=r,
        )

    @contextmanager
    def check_timer(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.check_seconds.observe(time.perf_counter() - start)

    def decision(self, d: Decision, model: str = "") -> None:
        """``model`` is the policy's model rule label (bounded), not ``d.model``."""
        org, department = _org_department(d.subject)
        self.decisions.labels(
            d.verdict.value, d.reason.value if d.reason else "", org, department, model
        ).inc()

    def settled(
        self,
        outcome: str,
        org: str = "",
        model: str = "",
        usage: TokenUsage | None = None,
        department: str = "",
        cost: tuple[float, str] | None = None,
    ) -> None:
        self.settlements.labels(outcome).inc()
        if usage is not None:
            self.tokens.labels(org, department, model, "input").inc(usage.input_tokens)
            self.tokens.labels(org, department, model, "cached_input").inc(
                usage.cached_input_tokens
            )
            self.tokens.labels(org, department, model, "output").inc(usage.output_tokens)
        if cost is not None:
            self.cost.labels(org, department, model, cost[1]).inc(cost[0])

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_breaker(self, snapshot: Callable[[], BreakerSnapshot] | None) -> None:
        """Breaker state, journal depth and replays, read from the breaker at each scrape.

        With no breaker (the memory ledger) the series still exist, at zero, so
        dashboards and alert rules see the same metrics on every deployment.
        """
        if snapshot is None:
            self.registry.register(_JournalReplays(lambda: (0, 0)))
            return
        self.breaker_state.set_function(lambda: int(snapshot().state))
        self.journal_entries.set_function(lambda: snapshot().journal_entries)
        self.registry.register(_JournalReplays(lambda: _replays(snapshot())))


    def watch_directory(self, stats: DirectoryStats) -> None:
        """The directory's lookups, cache answers and state (authz/directory)."""
        self.registry.register(DirectoryCollector(stats))


def _replays(snap: BreakerSnapshot) -> tuple[int, int]:
    return snap.replays, snap.replayed_entries


class _JournalReplays(Collector):
    """Counters kept by the breaker itself (Counter has no set_function)."""

    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        replays, entries = self._counts()
        yield CounterMetricFamily(
            "authz_journal_replays", "Journal replays that reached the ledger", replays
        )
        yield CounterMetricFamily(
            "authz_journal_replayed_entries", "Journal entries the ledger took on replay", entries
        )


def _org_department(subject: SubjectPath | None) -> tuple[str, str]:
    if subject is None:
        return "", ""
    return subject.org, subject.get("department") or ""
