"""Validation of the ``audit:`` and ``alerts:`` sections.

Same rules as :mod:`authz.policy.loader` (whose reader ``r`` is passed in): unknown keys
are errors, and every error names ``file:path`` and the bad value.

    audit:
      file: audit.jsonl          # memory:// ledger: the chain's file (relative: beside the policy)
      denials: true              # or false (default), or a list of deny reasons
    alerts:
      budgets: ["*"]             # budget names (shell patterns) that alert
      levels: [org, department, team]
      thresholds: [50, 80, 100]  # percent of the budget
      predictive: {min_elapsed: 0.05, lookback_s: 3600}      # or false
      anomaly: {factor: 3, bucket_s: 3600, baseline_buckets: 24, min_history: 3, min_units: 1000}
      cost_variance: {percent: 25, min_elapsed: 0.1}          # or false; cost budgets only
      webhooks:
        - {url: "https://hooks.example/authz", secret_env: AUTHZ_ALERT_WEBHOOK_SECRET}
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

from authz.decision import DenyReason
from authz.policy.observability import (
    AlertPolicy,
    AnomalyRule,
    AuditPolicy,
    CostVarianceRule,
    PredictiveRule,
    Webhook,
)

__all__ = ["parse_alerts", "parse_audit"]

T = TypeVar("T")
_LEVELS = ("org", "department", "team", "user", "app")
_REASONS = tuple(r.value for r in DenyReason)
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


class Reader(Protocol):
    """The slice of ``authz.policy.loader._Reader`` used here."""

    def fail(self, path: str, message: str, value: Any = ...) -> NoReturn: ...
    def mapping(
        self, value: Any, path: str, allowed: set[str], required: set[str] = ...
    ) -> Any: ...
    def string(self, value: Any, path: str, pattern: str | None = None) -> str: ...
    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str: ...
    def integer(self, value: Any, path: str, minimum: int = 0) -> int: ...
    def number(self, value: Any, path: str, minimum: float = 0.0) -> float: ...
    def boolean(self, value: Any, path: str) -> bool: ...
    def strings(self, value: Any, path: str) -> tuple[str, ...]: ...
    def items(self, value: Any, path: str, each: Callable[[Any, str], T]) -> tuple[T, ...]: ...


def parse_audit(r: Reader, raw: Any, base: Path) -> AuditPolicy:
    m = r.mapping({} if raw is None else raw, "audit", {"file", "denials"})
    file = None
    if "file" in m:
        path = Path(r.string(m["file"], "audit.file"))
        file = str(path if path.is_absolute() else base / path)
    denials: tuple[str, ...] = ()
    raw_denials = m.get("denials", False)
    if isinstance(raw_denials, bool):
        denials = _REASONS if raw_denials else ()
    elif isinstance(raw_denials, list) and raw_denials:
        denials = tuple(
            r.choice(v, f"audit.denials[{i}]", _REASONS) for i, v in enumerate(raw_denials)
        )
    else:
        why = "must be true, false or a non-empty list of deny reasons"
        r.fail("audit.denials", why, raw_denials)
    return AuditPolicy(enabled=True, file=file, denials=denials)


def _fraction(r: Reader, raw: Any, p: str) -> float:
    value = r.number(raw, p)
    if value >= 1:
        r.fail(p, "must be a share of the period below 1 (e.g. 0.1)", raw)
    return value


def _predictive(r: Reader, raw: Any) -> PredictiveRule | None:
    p = "alerts.predictive"
    if raw is False:
        return None
    d = PredictiveRule()
    m = r.mapping({} if raw is True else raw, p, {"min_elapsed", "lookback_s"})
    return PredictiveRule(
        min_elapsed=_fraction(r, m.get("min_elapsed", d.min_elapsed), f"{p}.min_elapsed"),
        lookback_s=r.number(m.get("lookback_s", d.lookback_s), f"{p}.lookback_s", 60),
    )


def _anomaly(r: Reader, raw: Any) -> AnomalyRule | None:
    p = "alerts.anomaly"
    if raw is False:
        return None
    d = AnomalyRule()
    m = r.mapping(
        {} if raw is True else raw,
        p,
        {"factor", "bucket_s", "baseline_buckets", "min_history", "min_units"},
    )
    rule = AnomalyRule(
        factor=r.number(m.get("factor", d.factor), f"{p}.factor", 1.1),
        bucket_s=r.number(m.get("bucket_s", d.bucket_s), f"{p}.bucket_s", 60),
        baseline_buckets=r.integer(
            m.get("baseline_buckets", d.baseline_buckets), f"{p}.baseline_buckets", 1
        ),
        min_history=r.integer(m.get("min_history", d.min_history), f"{p}.min_history", 1),
        min_units=r.integer(m.get("min_units", d.min_units), f"{p}.min_units", 0),
    )
    if rule.min_history > rule.baseline_buckets:
        r.fail(f"{p}.min_history", "cannot exceed baseline_buckets", rule.min_history)
    return rule


def _cost_variance(r: Reader, raw: Any) -> CostVarianceRule | None:
    p = "alerts.cost_variance"
    if raw is False:
        return None
    d = CostVarianceRule()
    m = r.mapping({} if raw is True else raw, p, {"percent", "min_elapsed"})
    return CostVarianceRule(
        percent=r.number(m.get("percent", d.percent), f"{p}.percent", 1),
        min_elapsed=_fraction(r, m.get("min_elapsed", d.min_elapsed), f"{p}.min_elapsed"),
    )


def _webhook(r: Reader, raw: Any, p: str) -> Webhook:
    m = r.mapping(raw, p, {"url", "secret_env", "timeout_s", "max_attempts"}, {"url", "secret_env"})
    env = m["secret_env"]
    if not isinstance(env, str) or not _ENV_NAME.fullmatch(env):
        # Never echo the value: it may be the secret itself, pasted by mistake.
        r.fail(
            f"{p}.secret_env",
            "must be the name of the environment variable that holds the secret "
            "(e.g. AUTHZ_ALERT_WEBHOOK_SECRET), not the secret",
        )
    return Webhook(
        url=r.string(m["url"], f"{p}.url", r"https?://\S+"),
        secret_env=env,
        timeout_s=r.number(m.get("timeout_s", 5.0), f"{p}.timeout_s", 0.1),
        max_attempts=r.integer(m.get("max_attempts", 5), f"{p}.max_attempts", 1),
    )


def parse_alerts(r: Reader, raw: Any) -> AlertPolicy:
    allowed = {
        "budgets",
        "levels",
        "thresholds",
        "predictive",
        "anomaly",
        "cost_variance",
        "webhooks",
    }
    m = r.mapping({} if raw is None else raw, "alerts", allowed)
    d = AlertPolicy()
    levels = d.levels
    if "levels" in m:
        names = r.strings(m["levels"], "alerts.levels")
        levels = tuple(r.choice(v, f"alerts.levels[{i}]", _LEVELS) for i, v in enumerate(names))
    thresholds = d.thresholds
    if "thresholds" in m:
        if not isinstance(m["thresholds"], list) or not m["thresholds"]:
            r.fail("alerts.thresholds", "must be a non-empty list of percentages", m["thresholds"])
        thresholds = tuple(
            r.integer(v, f"alerts.thresholds[{i}]", 1) for i, v in enumerate(m["thresholds"])
        )
        for i, t in enumerate(thresholds):
            if t > 1000:
                r.fail(f"alerts.thresholds[{i}]", "must be a percentage from 1 to 1000", t)
            if i and t <= thresholds[i - 1]:
                r.fail(f"alerts.thresholds[{i}]", "must be in increasing order", t)
    return AlertPolicy(
        enabled=True,
        budgets=r.strings(m["budgets"], "alerts.budgets") if "budgets" in m else d.budgets,
        levels=levels,
        thresholds=thresholds,
        predictive=_predictive(r, m.get("predictive", True)),
        anomaly=_anomaly(r, m.get("anomaly", True)),
        cost_variance=_cost_variance(r, m.get("cost_variance", True)),
        webhooks=r.items(m.get("webhooks"), "alerts.webhooks", lambda v, p: _webhook(r, v, p)),
    )
