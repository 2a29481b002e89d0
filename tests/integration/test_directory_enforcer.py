"""The enforcer with a directory in its policy, against a real slapd: a check is placed
by the directory, a policy reload that changes the directory section takes effect at
once, and a directory that cannot answer gives each on_down its decision (503
directory_unavailable for deny, with no reservation)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.decision import DenyReason, Verdict
from authz.directory import DirectoryUnavailable
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore
from tests.support.slapd import BASE, READER_DN, READER_PASSWORD, Slapd, group_ldif, person_ldif

pytestmark = pytest.mark.integration
KEY = "k-alice"
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 10}).encode()  # fmt: skip


def policy_text(url: str, on_down: str) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {digest}, claims: {{sub: alice}}}}]
subject:
  org: {{claim: org, missing: {{fallback: acme}}}}
  leaf: [{{level: user, claim: sub}}]
directory:
  url: {url}
  bind_dn: "{READER_DN}"
  password_file: ldap.pw
  base_dn: "ou=people,{BASE}"
  user_filter: "(uid={{subject}})"
  groups: {{attribute: memberOf}}
  levels:
    department: {{attribute: departmentNumber}}
    team: {{group: "^cn=team-(?P<name>[^,]+),", missing: skip}}
  on_down: {on_down}
budgets:
  - {{name: team-day, match: {{team: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    with Slapd(tmp_path / "slapd") as server:
        server.add(person_ldif("alice", "research") + group_ldif("team-nlp", ["alice"]))
        yield server


def check() -> CheckInput:
    return CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, BODY)


async def test_placed_by_the_directory_then_reloaded(slapd: Slapd, tmp_path: Path) -> None:
    (tmp_path / "ldap.pw").write_text(READER_PASSWORD)
    file = tmp_path / "policy.yaml"
    file.write_text(policy_text(slapd.url, "last_known"))
    store = PolicyStore(file)
    enforcer = Enforcer(store, MemoryLedger(FakeClock()), FakeClock())
    try:
        d = await enforcer.check(check())
        assert d.allowed and str(d.subject) == "org:acme/department:research/team:nlp/user:alice"
        first = enforcer.directory
        # the same directory reached by a port nothing listens on, and deny when down
        file.write_text(policy_text("ldap://127.0.0.1:1", "deny"))
        assert store.reload()
        assert enforcer.directory is not first and enforcer.directory is not None
        d = await enforcer.check(check())
        assert (d.verdict, d.status, d.reason) == (
            Verdict.DENY, 503, DenyReason.DIRECTORY_UNAVAILABLE,
        )  # fmt: skip
        assert d.reservation_id is None and not enforcer.directory_stats.up
        # fallback: placed on the fixed node, charged there
        file.write_text(policy_text("ldap://127.0.0.1:1",
                                    "{fallback: {department: unassigned}}"))  # fmt: skip
        assert store.reload()
        d = await enforcer.check(check())
        assert d.allowed and str(d.subject) == "org:acme/department:unassigned/user:alice"
    finally:
        await enforcer.aclose()


async def test_a_replaced_directory_stops_reporting(slapd: Slapd, tmp_path: Path) -> None:
    """The old directory, down and probing, must not mark the new one's state down."""
    (tmp_path / "ldap.pw").write_text(READER_PASSWORD)
    file = tmp_path / "policy.yaml"
    file.write_text(policy_text("ldap://127.0.0.1:1", "last_known"))
    store = PolicyStore(file)
    enforcer = Enforcer(store, MemoryLedger(FakeClock()), FakeClock())
    try:
        d = await enforcer.check(check())
        assert d.reason is DenyReason.DIRECTORY_UNAVAILABLE  # never seen, down
        old = enforcer.directory
        assert old is not None and old._watching is not None
        file.write_text(policy_text(slapd.url, "last_known"))
        assert store.reload()
        assert old._watching.cancelled() or old._watching.done() or old._retired
        assert (await enforcer.check(check())).allowed
        assert enforcer.directory_stats.up
        with pytest.raises(DirectoryUnavailable):  # a late probe of the old one ...
            await old._ask("authz-directory-probe")
        assert enforcer.directory_stats.up  # ... reports nowhere that matters
    finally:
        await enforcer.aclose()
