"""The ``management:`` policy section: validated like the rest of the policy (file:path
errors naming the bad value), and the pieces the API stands on: node paths, subtree
tests, counter keys that are the enforcer's own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from authz.admission import plan_limits
from authz.clock import FakeClock
from authz.errors import PolicyError
from authz.ledger import MemoryLedger
from authz.manage.model import NodeError, is_within, parse_node
from authz.manage.views import counters_for
from authz.policy.loader import load_policy
from authz.policy.periods import PeriodWindows
from authz.usage.types import TokenUsage
from tests.support.manage_env import write_policy
from tests.support.tokens import make_rsa_key

pytestmark = pytest.mark.unit


def _with_management(tmp_path: Path, section: str) -> Path:
    path = write_policy(tmp_path, make_rsa_key("manage-policy"))
    text = path.read_text()
    path.write_text(text[: text.index("management:")] + section)
    return path


@pytest.mark.parametrize(("section", "where", "words"), [
    ("management: {roles: [{role: boss, claim: r, value: x, scope: org}]}",
     "management.roles[0].role", "must be one of viewer, manager, approver, admin (got 'boss')"),
    ("management: {roles: [{role: manager, claim: r, value: x, scope: department}]}",
     "management.roles[0].max_tokens", "is required for a manager"),
    ("management: {roles: [{role: viewer, claim: r, value: x, scope: org, max_tokens: 5}]}",
     "management.roles[0].max_tokens", "applies to managers and approvers"),
    ("management: {roles: [{role: manager, claim: r, value: x, scope: user, max_tokens: 5}]}",
     "management.roles[0].scope", "must be one of org, department, team (got 'user')"),
    ("management: {roles: [{role: manager, claim: r, value: x, scope: org, max_tokens: lots}]}",
     "management.roles[0].max_tokens", "percentage like '50%'"),
    ("management: {roles: [{role: admin, claim: r, value: [x], scope: org}]}",
     "management.roles[0].value", "must be the claim's value"),
    ("management: {admin_keys_file: missing-file}",
     "management.admin_keys_file", "cannot be read"),
    ("management: {rolez: []}", "management.rolez", "unknown key"),
])  # fmt: skip
def test_bad_management_sections_name_file_and_path(tmp_path: Path, section: str, where: str,
                                                    words: str) -> None:  # fmt: skip
    path = _with_management(tmp_path, section)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}:{where}: "), str(err.value)
    assert words in str(err.value)


def test_an_admin_key_file_with_a_raw_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = _with_management(tmp_path, "management: {admin_keys_file: keys}")
    (tmp_path / "keys").write_text("ops sk-this-is-the-secret-itself\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert "line 1" in str(err.value) and "sk-this" not in str(err.value)


def test_shares_resolve_per_budget(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, make_rsa_key("manage-policy")))
    manager = next(r for r in policy.management.roles if r.role == "manager")
    assert manager.cap(1000) == 500
    assert next(r for r in policy.management.roles if r.role == "admin").cap(1000) is None
    assert len(policy.management.admin_keys) == 1


@pytest.mark.parametrize("text", ["", "acme", "department:x", "org:a/org:b", "org:a/user:u/team:t",
                                  "org:", "org:a b", "org:a|b", "org:a/user:x/app:y", "org:a/"])
def test_node_paths_that_are_no_node(text: str) -> None:
    with pytest.raises(NodeError):
        parse_node(text)


def test_node_paths_and_subtrees() -> None:
    assert str(parse_node("org:acme/team:nlp/user:al%40x")) == "org:acme/team:nlp/user:al%40x"
    assert is_within("org:acme/department:r/user:u", "org:acme/department:r")
    assert is_within("org:acme", "org:acme")
    assert not is_within("org:acme2", "org:acme")
    assert not is_within("org:acme/department:research2", "org:acme/department:research")


async def test_counter_keys_are_the_enforcers_own(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, make_rsa_key("manage-policy")))
    clock = FakeClock(time.time())
    ledger = MemoryLedger(clock)
    user = parse_node("org:acme/department:research/user:u1")
    planned = plan_limits(policy, user, "gpt-4o", PeriodWindows(policy.timezone), clock.now())
    for p in planned:  # use some of every counter the enforcer would
        await ledger.reserve(f"r-{p.limit.key}", (p.limit,), TokenUsage(7, 0, 0),
                             deadline=clock.now() + 60, expiry_charge=TokenUsage(0, 0, 0))
    for node in ("org:acme/department:research", "org:acme/department:research/user:u1"):
        counters = await counters_for(node, policy, ledger, None, clock.now())
        assert [c.reserved for c in counters] == [7], (node, counters)
