"""The ``ledger.breaker`` policy section: defaults, a full example, and every bad case."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.errors import PolicyError
from authz.policy.ledger_settings import BreakerSettings
from authz.policy.loader import load_policy

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "policies"
P = "ledger.breaker"

# file -> the exact message after "<file>:"
BAD = {
    "bad_breaker_mode": f"{P}.mode: must be one of fail_closed, fail_open, local_allowance "
    "(got 'fail_maybe')",
    "bad_breaker_unknown_key": f"{P}.cooldown_s: unknown key; allowed: call_timeout_s, failures, "
    "journal_max_bytes, journal_path, local_allowance_units, mode, open_s, window_s",
    "bad_breaker_allowance_missing": f"{P}.local_allowance_units: is required when mode is "
    "local_allowance",
    "bad_breaker_allowance_zero": f"{P}.local_allowance_units: must be an integer >= 1 (got 0)",
    "bad_breaker_failures": f"{P}.failures: must be an integer >= 1 (got 0)",
    "bad_breaker_timeout": f"{P}.call_timeout_s: must be a number >= 0.001 (got 0)",
    "bad_breaker_journal_max": f"{P}.journal_max_bytes: must be an integer >= 65536 (got 1024)",
    "bad_breaker_journal_path": f"{P}.journal_path: must be a non-empty string (got '')",
    "bad_breaker_not_mapping": f"{P}: must be a mapping (got 'fail_open')",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_breaker_section_names_file_path_and_value(name: str) -> None:
    file = FIXTURES / f"{name}.yaml"
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    assert str(err.value) == f"{file}:{BAD[name]}"


def test_default_is_fail_closed() -> None:
    policy = load_policy(FIXTURES / "good.yaml")
    assert policy.breaker == BreakerSettings()
    assert policy.breaker.mode == "fail_closed"
    assert policy.breaker.journal_path == "./authz-state/journal.jsonl"


def test_full_section_is_read() -> None:
    b = load_policy(FIXTURES / "good_breaker.yaml").breaker
    assert b == BreakerSettings(
        failures=3,
        window_s=5.0,
        open_s=2.5,
        call_timeout_s=0.02,
        mode="local_allowance",
        local_allowance_units=5000,
        journal_path="/var/lib/authz/journal.jsonl",
        journal_max_bytes=1 << 20,
    )
