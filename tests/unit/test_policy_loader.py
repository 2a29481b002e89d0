from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz.errors import PolicyError
from authz.policy.loader import load_policy

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "policies"
ROOT = Path(__file__).parent.parent.parent

# file -> the exact message after "<file>:"
BAD = {
    "bad_period": "budgets[0].period: must be one of hour, day, week, month (got 'fortnight')",
    "bad_tokens": "budgets[1].tokens: must be an integer >= 1 (got -5)",
    "bad_unknown_key": "budgetz: unknown key; allowed: access, alerts, audit, bounds, budgets, directory, identity, ledger, management, models, prices, "
    "queue, rates, requests, reservations, schedule, subject, timezone, version, weights",
    "bad_timezone": "timezone: is not a known IANA timezone (got 'Mars/Olympus')",
    "bad_algorithm": "identity.jwt.algorithms[0]: must be an asymmetric algorithm (ES256, ES384, ES512, "
    "EdDSA, PS256, PS384, PS512, RS256, RS384, RS512) (got 'HS256')",
    "bad_alg_none": "identity.jwt.algorithms[1]: must be an asymmetric algorithm (ES256, ES384, ES512, "
    "EdDSA, PS256, PS384, PS512, RS256, RS384, RS512) (got 'none')",
    "bad_match_level": "budgets[1].match.squad: unknown key; allowed: app, department, org, team, user",
    "bad_pattern": "subject.team.pattern: is not a valid regular expression: missing ), unterminated "
    "subpattern at position 6 (got '^team-(.+$')",
    "bad_duplicate_budget": "budgets[1].name: duplicate budget name (also budgets[0]) (got 'org-month')",
    "bad_unknown_model_free": "models.unknown: must be deny or {max_output_tokens: N} (never free) "
    "(got 'free')",
    "bad_missing_identity": "identity: is required",
    "bad_org_skip": "subject.org.missing: org cannot be skipped: every path starts at an org (got 'skip')",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_policy_names_file_path_and_value(name: str) -> None:
    file = FIXTURES / f"{name}.yaml"
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    assert str(err.value) == f"{file}:{BAD[name]}"


def test_missing_jwks_file_named() -> None:
    file = FIXTURES / "bad_jwks_file.yaml"
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    assert (
        str(err.value)
        == f"{file}:identity.jwt.jwks_file: file not found (got '{FIXTURES / 'nope.json'}')"
    )


def test_yaml_syntax_error_names_line() -> None:
    file = FIXTURES / "bad_yaml.yaml"
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    assert str(err.value).startswith(f"{file}: is not valid YAML at line ")


def test_good_policy_is_frozen_values() -> None:
    policy = load_policy(FIXTURES / "good.yaml")
    assert [b.name for b in policy.budgets] == ["org-month", "user-day"]
    assert policy.budgets[1].level == "user" and policy.budgets[1].period == "day"
    assert policy.models.default_output("gpt-4o") == 100
    assert policy.models.default_output("llama") is None
    with pytest.raises(AttributeError):
        policy.budgets[0].tokens = 5  # type: ignore[misc]


def test_example_policy_loads() -> None:
    policy = load_policy(ROOT / "examples" / "policy.yaml")
    assert policy.timezone.key == "Europe/Berlin"
    assert len(policy.identity.api_keys) == 3


@pytest.mark.parametrize(("file", "code"), [("good.yaml", 0), ("bad_period.yaml", 1)])
def test_check_config_command(file: str, code: int) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "authz", "check-config", str(FIXTURES / file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == code
    if code:
        assert (
            "budgets[0].period: must be one of hour, day, week, month (got 'fortnight')"
            in out.stderr
        )
    else:
        assert "ok (2 budgets" in out.stdout


def test_api_key_claims_must_be_a_mapping() -> None:
    import yaml

    from authz.policy.loader import parse_policy

    data = yaml.safe_load((FIXTURES / "good.yaml").read_text())
    data["identity"]["api_keys"] = [{"name": "k", "sha256": "a" * 64, "claims": ["org_id"]}]
    with pytest.raises(PolicyError) as err:
        parse_policy(data, str(FIXTURES / "p.yaml"))
    assert str(err.value) == (
        f"{FIXTURES / 'p.yaml'}:identity.api_keys[0].claims: must be a mapping of claim names to values "
        "(got ['org_id'])"
    )
