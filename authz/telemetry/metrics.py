"""Prometheus metrics. Labels are bounded: verdict, reason, org, model, never a user id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from authz.decision import Decision
from authz.usage.types import TokenUsage

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "authz_decisions", "Check decisions", ["verdict", "reason"], registry=r
        )
        self.check_seconds = Histogram(
            "authz_check_seconds", "Time to decide a Check", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.settlements = Counter(
            "authz_settlements", "Reservations settled", ["outcome"], registry=r
        )
        self.tokens = Counter(
            "authz_tokens", "Tokens settled from real usage", ["org", "model", "kind"], registry=r
        )
        self.expired = Counter(
            "authz_reservations_expired", "Reservations never settled", registry=r
        )
        self.reload_failures = Gauge(
            "authz_policy_reload_failures", "Failed policy reloads", registry=r
        )

    @contextmanager
    def check_timer(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.check_seconds.observe(time.perf_counter() - start)

    def decision(self, d: Decision) -> None:
        self.decisions.labels(d.verdict.value, d.reason.value if d.reason else "").inc()

    def settled(
        self, outcome: str, org: str = "", model: str = "", usage: TokenUsage | None = None
    ) -> None:
        self.settlements.labels(outcome).inc()
        if usage is not None:
            self.tokens.labels(org, model, "input").inc(usage.input_tokens)
            self.tokens.labels(org, model, "cached_input").inc(usage.cached_input_tokens)
            self.tokens.labels(org, model, "output").inc(usage.output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
