"""Model allow/deny lists per node (issue 16): inherited down the tree, only narrowed,
refused (403) before anything is reserved; the loader's errors name file:path."""

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
from authz.ledger import MemoryLedger
from authz.policy.loader import parse_policy
from authz.policy.model import Node, SubjectPath
from authz.policy.store import PolicyStore

pytestmark = pytest.mark.unit

KEYS = {"ka": ("research", "ann"), "kb": ("sales", "bob")}
HEAD = "version: 1\nidentity:\n  api_keys:\n" + "".join(
    f"    - {{name: {k}, sha256: {hashlib.sha256(k.encode()).hexdigest()}, claims: "
    f"{{org_id: acme, department: {d}, sub: {u}}}}}\n"
    for k, (d, u) in KEYS.items()
) + """subject:
  org: {claim: org_id}
  department: {claim: department}
  leaf: [{level: user, claim: sub}]
models:
  rules: [{match: "*", max_output_tokens: 10}]
budgets: [{name: d, match: {user: "*"}, tokens: 1000, period: day}]
"""
ACCESS = """access:
  - match: {org: acme}
    models: {allow: ["gpt-4o*", "claude-*"]}
  - match: {department: research}
    models: {allow: ["gpt-4o-mini*", "o3*"], deny: ["*-preview"]}
"""


def path(dept: str, user: str) -> SubjectPath:
    return SubjectPath((Node("org", "acme"), Node("department", dept), Node("user", user)))


def load(text: str) -> Any:
    return parse_policy(yaml.safe_load(HEAD + text), "p.yaml")


@pytest.mark.parametrize(
    ("dept", "model", "allowed"),
    [
        ("sales", "gpt-4o", True),
        ("sales", "claude-3-5-sonnet", True),
        ("sales", "o3-mini", False),  # not in the org's list
        ("research", "gpt-4o-mini", True),
        ("research", "gpt-4o", False),  # narrowed by the department
        ("research", "o3-mini", False),  # the department's allow cannot widen the org's
        ("research", "gpt-4o-mini-preview", False),  # denied below
        ("sales", None, False),  # a model nobody could read is not proven allowed
    ],
)
def test_lists_are_inherited_and_only_narrow(dept: str, model: str | None, allowed: bool) -> None:
    access = load(ACCESS).access
    assert (access.refusal(path(dept, "x"), model) is None) is allowed


def test_no_access_section_allows_every_model() -> None:
    assert load("").access.refusal(path("sales", "x"), "anything") is None


def test_the_refusal_names_the_node_and_the_entry() -> None:
    why = load(ACCESS).access.refusal(path("research", "ann"), "gpt-4o")
    assert why == (
        "model 'gpt-4o' is not allowed for org:acme/department:research/user:ann: the model "
        "list of org:acme/department:research (access[1].models) does not permit it"
    )


async def test_refused_with_403_before_anything_is_reserved(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(HEAD + ACCESS)
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    enf = Enforcer(PolicyStore(tmp_path / "p.yaml"), ledger, clock)

    def req(key: str, model: str) -> CheckInput:
        body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        return CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"},
                          json.dumps(body).encode())  # fmt: skip

    d = await enf.check(req("ka", "gpt-4o"))
    assert (d.status, d.reason, d.detail) == (403, DenyReason.MODEL_NOT_ALLOWED, "model_not_allowed")
    assert ledger.open_reservations == 0 and not ledger._counters
    ok = await enf.check(req("kb", "gpt-4o"))
    assert ok.allowed and ok.reservation_id


BAD = {
    "access: [{match: {org: acme}}]\n": "access[0].models: is required",
    "access: [{match: {org: acme}, models: {}}]\n": "access[0].models: needs allow, deny or both",
    "access: [{match: {org: acme}, models: {allow: []}}]\n":
    "access[0].models.allow: must be a non-empty list of model patterns (got [])",
    "access: [{match: {org: acme}, models: {deny: ['']}}]\n":
    "access[0].models.deny[0]: must be a non-empty string (got '')",
    "access: [{match: {org: acme}, models: {deny: ['gpt 4']}}]\n":
    "access[0].models.deny[0]: must match [^\\s]+ (got 'gpt 4')",
    "access: [{match: {org: acme}, models: {only: [x]}}]\n":
    "access[0].models.only: unknown key; allowed: allow, deny",
    "access: [{match: {squad: a}, models: {allow: [x]}}]\n":
    "access[0].match.squad: unknown key; allowed: app, department, org, team, user",
    "access: {match: {org: acme}}\n": "access: must be a list (got {'match': {'org': 'acme'}})",
}


@pytest.mark.parametrize("text", sorted(BAD))
def test_bad_access_names_file_path_and_value(text: str) -> None:
    with pytest.raises(PolicyError) as err:
        load(text)
    assert str(err.value) == f"p.yaml:{BAD[text]}"
