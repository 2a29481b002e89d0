"""Claim values cannot name another node's counter, on every ledger backend (issue 9, #9).

A subject path is ``org:acme/department:research/team:nlp/user:bob`` and a ledger key
``<budget>|<path>|<window>``. Before claim values were escaped, a caller whose
department claim was ``research/team:nlp`` (and who had no team) with ``sub: bob`` got
exactly bob's path, so it spent bob's user budget. The checks here go through the real
enforcer (API keys -> claims -> path -> limits -> ledger) against each backend.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.decision import DenyReason, Verdict
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import Ledger
from authz.policy.names import MAX_NAME_CHARS
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage

# Each caller: an API key and its claims. mallory's claims spell bob's path with
# separators; the others put separators, braces and an "@" where the org goes.
CALLERS: dict[str, dict[str, object]] = {
    "bob": {"org_id": "acme", "department": "research", "groups": ["team-nlp"], "sub": "bob"},
    "mallory": {"org_id": "acme", "department": "research/team:nlp", "sub": "bob"},
    "pipe": {"org_id": "acme", "department": "research", "groups": ["team-nlp"],
             "sub": "bob|user-day"},
    "orgslot": {"org_id": "acme}/department:research", "sub": "bob"},
    "at": {"org_id": "x@acme", "department": "research", "groups": ["team-nlp"], "sub": "bob"},
    "long": {"org_id": "acme", "sub": "b" * (MAX_NAME_CHARS + 1)},
}  # fmt: skip


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _policy(tmp_path: Path) -> Path:
    keys = [
        {"name": name, "sha256": _digest(f"k-{name}"), "claims": claims}
        for name, claims in CALLERS.items()
    ]
    policy = {
        "version": 1,
        "timezone": "UTC",
        "identity": {"api_keys": keys},
        "subject": {
            "org": {"claim": "org_id"},
            "department": {"claim": "department", "missing": {"fallback": "unassigned"}},
            "team": {"claim": "groups", "pattern": "^team-(?P<name>.+)$", "missing": "skip"},
            "leaf": [{"level": "user", "claim": "sub"}],
        },
        "budgets": [
            {"name": "org-day", "match": {"org": "*"}, "tokens": 10**9, "period": "day"},
            {"name": "user-day", "match": {"user": "*"}, "tokens": 100, "period": "day"},
        ],
        "models": {"rules": [{"match": "gpt-*", "max_output_tokens": 10}]},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy))  # JSON is YAML
    return path


def _check(name: str, max_tokens: int) -> CheckInput:
    body = {"model": "gpt-4o", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    return CheckInput(
        "POST", "/v1/chat/completions", {"x-api-key": f"k-{name}"}, json.dumps(body).encode()
    )


@pytest.fixture
def enforcer(env: tuple[Ledger, FakeClock], tmp_path: Path) -> Enforcer:
    ledger, clock = env
    return Enforcer(PolicyStore(_policy(tmp_path)), ledger, clock)


async def _user_day(enforcer: Enforcer, ledger: Ledger, name: str) -> tuple[str, int]:
    """The user-day counter of caller ``name``: its key and the units used or held."""
    d = await enforcer.check(_check(name, 1))
    assert d.verdict is Verdict.ALLOW and d.subject is not None, d.message
    assert d.reservation_id is not None
    await enforcer.release(d.reservation_id)
    (limit,) = [lim for lim in enforcer.limits_for(enforcer.policy, d.subject)
                if lim.budget == "user-day"]  # fmt: skip
    bal = await ledger.balance(limit)
    return limit.key, bal.used + bal.reserved


@pytest.mark.parametrize("attacker", ["mallory", "pipe", "orgslot", "at"])
async def test_separators_in_claims_never_touch_another_users_counter(
    env: tuple[Ledger, FakeClock], enforcer: Enforcer, attacker: str
) -> None:
    ledger, _ = env
    bob_key, _ = await _user_day(enforcer, ledger, "bob")
    # The attacker spends 70 of its 100 and settles.
    d = await enforcer.check(_check(attacker, 10))
    assert d.verdict is Verdict.ALLOW, d.message
    assert d.reservation_id is not None and d.subject is not None
    assert await enforcer.settle(d.reservation_id, TokenUsage(60, 0, 10))
    attacker_key, spent = await _user_day(enforcer, ledger, attacker)
    assert attacker_key != bob_key and spent == 70
    # bob's counter is untouched: his whole budget is still there.
    d = await enforcer.check(_check("bob", 10))
    assert d.verdict is Verdict.ALLOW, f"bob was refused after {attacker} spent: {d.message}"
    assert d.quota is not None and d.quota.remaining >= 80
    # Every name in the path is one node: no separator survived in a claim value.
    assert d.subject is not None
    assert str(d.subject) == "org:acme/department:research/team:nlp/user:bob"


async def test_separators_in_the_org_keep_the_reservation_settleable(
    env: tuple[Ledger, FakeClock], enforcer: Enforcer
) -> None:
    """The org rides in the reservation id (``<hex>@<org>``) and picks the Redis slot:
    an org with ``@``, ``/`` or braces must still find its own reservation on settle."""
    ledger, _ = env
    for name in ("orgslot", "at"):
        d = await enforcer.check(_check(name, 10))
        assert d.verdict is Verdict.ALLOW and d.reservation_id is not None
        assert d.reservation_id.count("@") == 1
        org = d.reservation_id.partition("@")[2]
        assert not set(org) & set("/{}|: ")
        assert await enforcer.settle(d.reservation_id, TokenUsage(5, 0, 5))
        assert not await enforcer.settle(d.reservation_id, TokenUsage(5, 0, 5))  # once
        _, spent = await _user_day(enforcer, ledger, name)
        assert spent == 10


async def test_a_claim_value_past_the_bound_is_refused(enforcer: Enforcer) -> None:
    d = await enforcer.check(_check("long", 1))
    assert d.verdict is Verdict.DENY and d.status == 403
    assert d.reason is DenyReason.SUBJECT_UNMAPPED
    assert f"longer than {MAX_NAME_CHARS} characters" in d.message
