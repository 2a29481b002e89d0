"""The ``audit:`` and ``alerts:`` policy sections: parsed whole, every error file:path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz.errors import PolicyError
from authz.policy.loader import load_policy
from authz.policy.observability import AlertPolicy, AuditPolicy, CostVarianceRule, Webhook

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "policies"

BAD = {
    "bad_audit_denials": "audit.denials: must be true, false or a non-empty list of deny "
    "reasons (got 'sometimes')",
    "bad_audit_unknown_key": "audit.retention: unknown key; allowed: denials, file",
    "bad_alerts_threshold_order": "alerts.thresholds[1]: must be in increasing order (got 50)",
    "bad_alerts_unknown_key": "alerts.channels: unknown key; allowed: anomaly, budgets, "
    "cost_variance, levels, predictive, thresholds, webhooks",
    "bad_alerts_level": "alerts.levels[1]: must be one of org, department, team, user, app "
    "(got 'squad')",
    "bad_alerts_anomaly_history": "alerts.anomaly.min_history: cannot exceed baseline_buckets "
    "(got 6)",
    "bad_alerts_predictive_elapsed": "alerts.predictive.min_elapsed: must be a share of the "
    "period below 1 (e.g. 0.1) (got 1.5)",
    "bad_alerts_webhook_url": "alerts.webhooks[0].url: must match https?://\\S+ "
    "(got 'ftp://hooks.example/authz')",
    "bad_alerts_webhook_secret_env": "alerts.webhooks[0].secret_env: must be the name of the "
    "environment variable that holds the secret (e.g. AUTHZ_ALERT_WEBHOOK_SECRET), not the secret",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_section_names_file_path_and_value(name: str) -> None:
    file = FIXTURES / f"{name}.yaml"
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    assert str(err.value) == f"{file}:{BAD[name]}"


def test_unknown_deny_reason_is_named() -> None:
    file = FIXTURES / "bad_audit_denial_reason.yaml"
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}:audit.denials[1]: must be one of budget_exhausted, ")
    assert msg.endswith("(got 'too_expensive')")


def test_secret_pasted_as_env_name_is_never_echoed() -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(FIXTURES / "bad_alerts_webhook_secret_env.yaml")
    assert "s3cr3t" not in str(err.value)


def test_sections_are_off_without_them() -> None:
    policy = load_policy(FIXTURES / "good.yaml")
    assert policy.audit == AuditPolicy() and not policy.audit.enabled
    assert policy.alerts == AlertPolicy() and not policy.alerts.enabled


def test_good_sections_parse_to_frozen_values() -> None:
    policy = load_policy(FIXTURES / "good_observability.yaml")
    audit, alerts = policy.audit, policy.alerts
    assert audit.enabled and audit.file == str(FIXTURES / "audit.jsonl")  # beside the policy
    assert audit.denials == ("budget_exhausted", "unauthenticated")
    assert alerts.enabled and alerts.thresholds == (50, 80, 100)
    assert alerts.levels == ("org", "department") and alerts.budgets == ("org-*",)
    assert alerts.predictive is not None and alerts.predictive.lookback_s == 1800
    assert alerts.anomaly is None
    assert alerts.cost_variance == CostVarianceRule(percent=40, min_elapsed=0.1)
    assert alerts.webhooks == (
        Webhook("https://hooks.example/authz", "HOOK_SECRET", timeout_s=5.0, max_attempts=3),
    )
    assert alerts.watches("org-month", "org") and not alerts.watches("user-day", "user")
    with pytest.raises(AttributeError):
        alerts.thresholds = ()  # type: ignore[misc]


def test_check_config_reports_a_bad_section() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "authz", "check-config", str(FIXTURES / "bad_alerts_level.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "alerts.levels[1]: must be one of org, department, team, user, app (got 'squad')" in (
        out.stderr
    )
