"""The ``audit:`` and ``alerts:`` sections of the policy, as frozen values.

Parsed by :mod:`authz.policy.loader_observability`; read by :mod:`authz.audit` and
:mod:`authz.alerts`. Both sections are optional: without them there is no audit trail
and no alert engine (the Prometheus metrics and rules work either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = [
    "AlertPolicy",
    "AnomalyRule",
    "AuditPolicy",
    "CostVarianceRule",
    "PredictiveRule",
    "Webhook",
]


@dataclass(frozen=True, slots=True)
class AuditPolicy:
    enabled: bool = False
    # The chain's file when the ledger is memory:// (redis:// keeps it in a Redis stream).
    file: str | None = None
    # Deny reasons (DenyReason values) whose decisions are audited; () audits none.
    denials: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PredictiveRule:
    """Fire when the recent burn rate says the budget runs out before its period ends."""

    min_elapsed: float = 0.05  # share of the period that must have passed (no 00:01 alarms)
    lookback_s: float = 3600.0  # the burn rate is measured over this much recent time


@dataclass(frozen=True, slots=True)
class AnomalyRule:
    """Fire when a node's usage in one bucket is ``factor`` times its own recent average."""

    factor: float = 3.0
    bucket_s: float = 3600.0
    baseline_buckets: int = 24  # how many past buckets make the baseline
    min_history: int = 3  # buckets of history needed before judging at all
    min_units: int = 1000  # ignore spikes smaller than this (tiny baselines)


@dataclass(frozen=True, slots=True)
class CostVarianceRule:
    """Cost budgets only: spend so far vs the even-pace plan (amount x elapsed share)."""

    percent: float = 25.0  # fire when spend runs this far ahead of plan
    min_elapsed: float = 0.1


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret_env: str  # the environment variable holding the HMAC key (never the key itself)
    timeout_s: float = 5.0
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    enabled: bool = False
    budgets: tuple[str, ...] = ("*",)  # budget names (shell patterns) that alert
    levels: tuple[str, ...] = ("org", "department", "team")  # node levels that alert
    thresholds: tuple[int, ...] = (50, 80, 100)  # percent of the budget's amount
    predictive: PredictiveRule | None = PredictiveRule()
    anomaly: AnomalyRule | None = AnomalyRule()
    cost_variance: CostVarianceRule | None = CostVarianceRule()
    webhooks: tuple[Webhook, ...] = ()

    def watches(self, budget: str, level: str) -> bool:
        return level in self.levels and any(fnmatchcase(budget, p) for p in self.budgets)
