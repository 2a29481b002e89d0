"""Budgets shared by a group (issue 16): one counter for every caller whose claims hold
the group's values, across departments, checked with the tree's budgets all or nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.clock import FakeClock
from authz.decision import DenyReason
from authz.enforcer import CheckInput, Enforcer
from authz.errors import PolicyError
from authz.groups import is_member
from authz.ledger import MemoryLedger
from authz.policy.loader import parse_policy
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

CALLERS = {  # key: department, user, projects claim
    "ka": ("research", "ann", "[apollo, gemini]"),
    "kb": ("sales", "bob", "apollo"),
    "kc": ("sales", "cy", "zeus"),
}
HEAD = "version: 1\nidentity:\n  api_keys:\n" + "".join(
    f"    - {{name: {k}, sha256: {hashlib.sha256(k.encode()).hexdigest()}, claims: "
    f"{{org_id: acme, department: {d}, sub: {u}, projects: {p}}}}}\n"
    for k, (d, u, p) in CALLERS.items()
) + """subject:
  org: {claim: org_id}
  department: {claim: department}
  leaf: [{level: user, claim: sub}]
models:
  rules: [{match: "*", max_output_tokens: 10}]
"""
BUDGETS = """budgets:
  - {name: user-daily, match: {user: "*"}, tokens: 10000, period: day}
  - {name: apollo-daily, match: {org: "*"}, group: {projects: apollo}, tokens: 1000, period: day,
     over_reserve: deny}
"""


def req(key: str, max_tokens: int) -> CheckInput:
    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"},
                      json.dumps(body).encode())  # fmt: skip


async def test_members_across_departments_share_one_counter(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(HEAD + BUDGETS)
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    enf = Enforcer(PolicyStore(tmp_path / "p.yaml"), ledger, clock)
    a = await enf.check(req("ka", 10))
    assert a.reservation_id and a.quota is not None
    assert (a.quota.budget, a.quota.node) == ("apollo-daily", "org:acme/group:apollo-daily")
    await enf.settle(a.reservation_id, TokenUsage(700, 0, 0))
    b = await enf.check(req("kb", 400))  # bob, in sales: the group has 300 left
    assert b.reason is DenyReason.BUDGET_EXHAUSTED and b.detail == "apollo-daily"
    assert ledger.open_reservations == 0  # nothing held on bob's own budget either
    ok = await enf.check(req("kb", 200))
    assert ok.allowed and ok.quota is not None and ok.quota.budget == "apollo-daily"
    c = await enf.check(req("kc", 400))  # not a member: only his own budget applies
    assert c.allowed and c.quota is not None and c.quota.budget == "user-daily"


def test_membership_by_value_or_list_item() -> None:
    group = (("projects", "apollo"), ("tier", "1"))
    assert is_member(group, {"projects": ["x", "apollo"], "tier": 1})
    assert is_member(group, {"projects": "apollo", "tier": "1"})
    assert not is_member(group, {"projects": "apollo"})
    assert not is_member(group, {"projects": ["apollo"], "tier": True})
    assert not is_member(group, {"projects": {"apollo": 1}, "tier": 1})


def load(budgets: str) -> Any:
    return parse_policy(yaml.safe_load(HEAD + "budgets:\n" + budgets), "p.yaml")


def test_a_group_budget_is_read() -> None:
    (b,) = load("  - {name: g, match: {org: acme}, group: {team_id: 7, projects: x}, "
                "tokens: 5, period: day}\n").budgets  # fmt: skip
    assert (b.group, b.level) == ((("projects", "x"), ("team_id", "7")), "group")


BAD = {
    "  - {name: g, match: {org: acme}, group: {}, tokens: 5, period: day}\n":
    "budgets[0].group: must be a mapping of claim names to values, e.g. {project: apollo} "
    "(got {})",
    "  - {name: g, match: {org: acme}, group: apollo, tokens: 5, period: day}\n":
    "budgets[0].group: must be a mapping of claim names to values, e.g. {project: apollo} "
    "(got 'apollo')",
    "  - {name: g, match: {org: acme}, group: {projects: [a, b]}, tokens: 5, period: day}\n":
    "budgets[0].group.projects: must be a non-empty string or a number (got ['a', 'b'])",
    "  - {name: g, match: {org: acme}, group: {vip: true}, tokens: 5, period: day}\n":
    "budgets[0].group.vip: must be a non-empty string or a number (got True)",
}


@pytest.mark.parametrize("budgets", sorted(BAD))
def test_bad_group_names_file_path_and_value(budgets: str) -> None:
    with pytest.raises(PolicyError) as err:
        load(budgets)
    assert str(err.value) == f"p.yaml:{BAD[budgets]}"
