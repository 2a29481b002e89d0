"""What a client gets from the enforcer while the ledger's breaker is open, per mode."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.decision import DenyReason, Verdict
from authz.enforcer import CheckInput, Enforcer
from authz.envoy.convert import check_response
from authz.ledger import MemoryLedger
from authz.ledger.breaker import BreakerLedger, BreakerState
from authz.ledger.journal import Journal
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage
from tests.support.flaky_ledger import FlakyLedger

pytestmark = pytest.mark.unit

POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: alice, sha256: {hashlib.sha256(b"k-alice").hexdigest()}, claims: {{org_id: acme, sub: alice}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
ledger:
  breaker: {{failures: 2, open_s: 5, call_timeout_s: 0.01, mode: MODE, local_allowance_units: 300}}
"""
CHAT = b'{"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}'
REQ = CheckInput("POST", "/v1/chat/completions", {"authorization": "Bearer k-alice"}, CHAT)


def build(tmp_path: Path, mode: str) -> tuple[Enforcer, BreakerLedger, FlakyLedger, FakeClock]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("MODE", mode))
    store = PolicyStore(path)
    clock = FakeClock()
    inner = FlakyLedger(MemoryLedger(clock))
    settings = replace(store.current.breaker, journal_path=str(tmp_path / "journal.jsonl"))
    breaker = BreakerLedger(inner, settings, clock, Journal.open(settings.journal_path, 1 << 20))
    return Enforcer(store, breaker, clock), breaker, inner, clock


async def test_fail_closed_is_a_503_with_a_clear_message(tmp_path: Path) -> None:
    enf, breaker, inner, _ = build(tmp_path, "fail_closed")
    inner.fault = "down"
    for _ in range(3):
        d = await enf.check(REQ)
        assert (d.verdict, d.status, d.reason) == (Verdict.DENY, 503, DenyReason.LEDGER_UNAVAILABLE)
    assert "quota service is unreachable" in d.message and "fails closed" in d.message
    assert breaker.snapshot().state is BreakerState.OPEN
    await breaker.close()


async def test_fail_open_admits_with_a_local_reservation(tmp_path: Path) -> None:
    enf, breaker, inner, clock = build(tmp_path, "fail_open")
    inner.fault = "down"
    d = await enf.check(REQ)
    assert d.allowed and d.reservation_id is not None and d.reservation_id.startswith("local:")
    assert await enf.settle(d.reservation_id, TokenUsage(10, 0, 20))
    inner.fault = None
    clock.advance(5)
    await enf.expire_overdue()  # the sweep probes, closes, and the journal is replayed
    await breaker.drain()
    assert breaker.snapshot().journal_entries == 0
    await breaker.close()


async def test_local_allowance_used_up_is_a_retryable_429(tmp_path: Path) -> None:
    enf, breaker, inner, _ = build(tmp_path, "local_allowance")
    inner.fault = "down"
    admitted = 0
    while (d := await enf.check(REQ)).allowed:  # each holds its prompt estimate + 100
        admitted += 1
    assert admitted == 2  # 300 units of local allowance: two fit, a third does not
    assert (d.status, d.reason, d.detail) == (429, DenyReason.RATE_LIMITED, "local_allowance")
    assert "local allowance for 'user-day'" in d.message and d.retry_after_s == 5
    headers = {h.header.key: h.header.value for h in check_response(d, REQ).denied_response.headers}
    assert headers["retry-after"] == "5" and headers["x-should-retry"] == "true"
    await breaker.close()
