"""Admission control with a fake clock: rates, the wait queue, soft and burst budgets,
cost budgets, peak hours."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from authz.clock import FakeClock
from authz.decision import Decision, DenyReason
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

HEAD = """
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: a, sha256: {}, claims: {{org_id: acme, department: research, sub: ann}}}}
    - {{name: b, sha256: {}, claims: {{org_id: acme, department: research, sub: bob}}}}
    - {{name: c, sha256: {}, claims: {{org_id: acme, department: sales, sub: cy, priority: 9}}}}
    - {{name: j, sha256: {}, claims: {{org_id: acme, department: research, client_id: batch}}}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: app, claim: client_id}}, {{level: user, claim: sub}}]
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}, {{match: "cheap-*", max_output_tokens: 10}}]
""".format(*(hashlib.sha256(k.encode()).hexdigest() for k in ("ka", "kb", "kc", "kj")))

Build = Callable[[str], Enforcer]


@pytest.fixture
def clock() -> FakeClock:
    # Tuesday 2026-03-03 10:00 UTC: inside the peak used below.
    return FakeClock(datetime(2026, 3, 3, 10, 0, tzinfo=ZoneInfo("UTC")).timestamp())


@pytest.fixture
def build(tmp_path: Path, clock: FakeClock) -> Build:
    def make(body: str) -> Enforcer:
        path = tmp_path / "p.yaml"
        path.write_text(HEAD + body)
        return Enforcer(PolicyStore(path), MemoryLedger(clock), clock)

    return make


def req(
    key: str = "ka", max_tokens: int = 10, model: str = "gpt-4o", text: str = "hi"
) -> CheckInput:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    return CheckInput(
        "POST",
        "/v1/chat/completions",
        {"authorization": f"Bearer {key}"},
        json.dumps(body).encode(),
    )


async def test_requests_per_minute_resets_with_the_minute(build: Build, clock: FakeClock) -> None:
    enf = build("budgets: []\nrates: [{name: rpm, match: {user: '*'}, requests_per_minute: 2}]\n")
    assert (await enf.check(req())).allowed and (await enf.check(req())).allowed
    d = await enf.check(req())
    assert (d.status, d.reason, d.detail) == (429, DenyReason.RATE_LIMITED, "rpm")
    assert d.retry_after_s is not None and 0 < d.retry_after_s <= 60
    assert (await enf.check(req("kb"))).allowed  # bob has his own counter
    clock.advance(60)
    assert (await enf.check(req())).allowed


async def test_tokens_per_minute_counts_raw_tokens(build: Build) -> None:
    enf = build(
        "budgets: []\nweights: {output: 5}\n"
        "rates: [{name: tpm, match: {department: '*'}, tokens_per_minute: 50}]\n"
    )
    first = await enf.check(req(max_tokens=20))  # ~5 + 20 raw tokens, not 5 + 100
    assert first.allowed
    assert (await enf.check(req(max_tokens=20))).allowed
    d = await enf.check(req("kb", max_tokens=20))  # same department
    assert d.reason is DenyReason.RATE_LIMITED and "tpm" in d.message


async def test_concurrency_released_on_settle(build: Build) -> None:
    enf = build("budgets: []\nrates: [{name: conc, match: {user: '*'}, concurrent: 1}]\n")
    first = await enf.check(req())
    assert first.reservation_id
    d = await enf.check(req())
    assert d.reason is DenyReason.RATE_LIMITED and d.retry_after_s == 1.0
    await enf.settle(first.reservation_id, TokenUsage(5, 0, 5))
    assert (await enf.check(req())).allowed


async def test_budget_denial_wins_over_rate_and_never_queues(build: Build) -> None:
    enf = build(
        "budgets: [{name: tiny, match: {user: '*'}, tokens: 20, period: day}]\n"
        "rates: [{name: rpm, match: {user: '*'}, requests_per_minute: 1}]\n"
        "queue: {max_wait_s: 5}\n"
    )
    assert (await enf.check(req())).allowed
    d = await enf.check(req())  # both are exhausted: the period budget is named, no wait
    assert d.reason is DenyReason.BUDGET_EXHAUSTED and d.detail == "tiny"


async def test_queue_admits_by_priority_then_fifo(build: Build) -> None:
    enf = build(
        "budgets: []\nrates: [{name: conc, match: {org: acme}, concurrent: 1}]\n"
        "queue: {max_wait_s: 5, priority: {claim: priority, rules: "
        "[{match: {app: '*'}, priority: -5}]}}\n"
    )
    holder = await enf.check(req())
    assert holder.reservation_id
    order: list[str] = []

    async def waiter(key: str) -> Decision:
        d = await enf.check(req(key))
        order.append(key)
        return d

    tasks = []
    for key in ("kj", "ka", "kb", "kc"):  # batch app (-5), ann (0), bob (0), cy (claim 9)
        tasks.append(asyncio.create_task(waiter(key)))
        await asyncio.sleep(0.01)
    assert enf.queue_depth == 4
    current = holder.reservation_id
    pending = set(tasks)
    for _ in range(4):  # free the one slot: exactly the next in line gets it
        assert current is not None
        await enf.settle(current, TokenUsage(1, 0, 1))
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED, timeout=2)
        assert len(done) == 1
        current = done.pop().result().reservation_id
    assert order == ["kc", "ka", "kb", "kj"]


async def test_queue_times_out_with_retry_after(build: Build) -> None:
    enf = build(
        "budgets: []\nrates: [{name: conc, match: {user: '*'}, concurrent: 1}]\n"
        "queue: {max_wait_s: 0.05}\n"
    )
    assert (await enf.check(req())).allowed
    d = await enf.check(req())
    assert d.reason is DenyReason.RATE_LIMITED and "max_wait" in d.message
    assert d.retry_after_s is not None and enf.queue_depth == 0


async def test_cancelled_waiter_leaves_and_reserves_nothing(build: Build) -> None:
    enf = build(
        "budgets: []\nrates: [{name: conc, match: {user: '*'}, concurrent: 1}]\n"
        "queue: {max_wait_s: 5}\n"
    )
    holder = await enf.check(req())
    task = asyncio.create_task(enf.check(req()))
    await asyncio.sleep(0.02)
    assert enf.queue_depth == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert enf.queue_depth == 0
    assert holder.reservation_id is not None
    await enf.settle(holder.reservation_id, TokenUsage(1, 0, 1))
    assert (await enf.check(req())).allowed  # the cancelled check held no slot


async def test_queue_overflow_denied_at_once(build: Build) -> None:
    enf = build(
        "budgets: []\nrates: [{name: conc, match: {org: acme}, concurrent: 1}]\n"
        "queue: {max_wait_s: 5, max_depth: 1}\n"
    )
    assert (await enf.check(req())).allowed
    first = asyncio.create_task(enf.check(req("kb")))
    await asyncio.sleep(0.02)
    d = await enf.check(req("kc"))
    assert d.reason is DenyReason.RATE_LIMITED and d.detail == "queue_full"
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_soft_budget_warns_within_grace_then_hard(build: Build) -> None:
    enf = build(
        "budgets: [{name: soft, match: {user: '*'}, tokens: 40, period: day, "
        "soft: {grace: '50%'}}]\n"
    )
    a = await enf.check(req(max_tokens=10, text="x" * 60))  # 15 + 4 + 10 = 29 of 40
    assert a.allowed and not a.warnings
    b = await enf.check(req(max_tokens=10, text="x" * 60))  # 58: past 40, within 60
    assert (
        b.allowed and b.warnings and "soft" in b.warnings[0] and "hard stop at 60" in b.warnings[0]
    )
    c = await enf.check(req(max_tokens=10, text="x" * 60))  # 87 > 60
    assert c.reason is DenyReason.BUDGET_EXHAUSTED


async def test_burst_borrows_and_next_period_opens_with_debt(
    build: Build, clock: FakeClock
) -> None:
    enf = build(
        "budgets: [{name: bursty, match: {user: '*'}, tokens: 100, period: day, burst: 50}]\n"
    )
    d = await enf.check(req(max_tokens=10))
    assert d.reservation_id
    await enf.settle(d.reservation_id, TokenUsage(140, 0, 0))  # 40 over the nominal 100
    over = await enf.check(req(max_tokens=5))
    assert over.allowed and over.warnings and "borrowing" in over.warnings[0]
    assert over.reservation_id
    await enf.settle(over.reservation_id, TokenUsage(0, 0, 0))
    clock.advance(86400)
    nxt = await enf.check(req(max_tokens=1))
    assert nxt.allowed and nxt.quota is not None
    # 150 ceiling - 40 debt - this reservation (~6)
    assert nxt.quota.remaining == 150 - 40 - (nxt.input_estimate + 1)


async def test_cost_budget_converts_tokens_with_prices(build: Build) -> None:
    enf = build(
        "budgets: [{name: spend, match: {org: acme}, cost: 0.001, period: month}]\n"
        "prices:\n  models:\n    - {match: 'gpt-*', input: 2.5, cached_input: 1.25, output: 10}\n"
        "    - {match: 'cheap-*', input: 0.1, output: 0.2}\n"
    )
    d = await enf.check(req(max_tokens=10))
    assert d.reservation_id
    # 1000 micro-dollars; settle 100 in + 40 cached + 50 out = 250 + 50 + 500 micro-dollars
    await enf.settle(d.reservation_id, TokenUsage(100, 40, 50))
    left = await enf.check(req(max_tokens=10, model="cheap-1"))
    assert left.allowed
    denied = await enf.check(req(max_tokens=100))  # needs 5*2.5 + 100*10 > 200 left
    assert denied.reason is DenyReason.BUDGET_EXHAUSTED and denied.detail == "spend"


async def test_unpriced_model_denied_or_default(build: Build) -> None:
    base = "budgets: [{name: spend, match: {org: acme}, cost: 10, period: month}]\n"
    enf = build(base + "prices: {models: [{match: 'cheap-*', input: 1, output: 1}]}\n")
    d = await enf.check(req(model="gpt-4o"))
    assert (d.status, d.detail) == (400, "model_not_priced")
    enf2 = build(base + "prices: {models: [], unpriced: {input: 3, output: 3}}\n")
    assert (await enf2.check(req(model="gpt-4o"))).allowed


PEAK = (
    "budgets: []\nschedule:\n  peak: {days: [mon, tue, wed, thu, fri], from: '09:00', to: '18:00'}\n"
    "  non_critical: [{app: '*'}]\n"
)


async def test_non_critical_deferred_during_peak(build: Build, clock: FakeClock) -> None:
    enf = build(PEAK)
    d = await enf.check(req("kj"))
    assert d.reason is DenyReason.OFF_PEAK and d.retry_after_s == 8 * 3600
    assert (await enf.check(req("ka"))).allowed  # users are critical
    clock.advance(8 * 3600)
    assert (await enf.check(req("kj"))).allowed


async def test_non_critical_queued_when_peak_ends_within_max_wait(
    build: Build, clock: FakeClock
) -> None:
    enf = build(PEAK + "  during_peak: queue\nqueue: {max_wait_s: 0.05}\n")
    clock.advance(8 * 3600 - 0.02)  # 17:59:59.98
    assert (await enf.check(req("kj"))).allowed


def test_check_config_warns_when_envoy_times_out_before_max_wait(tmp_path: Path) -> None:
    import subprocess
    import sys

    policy = tmp_path / "p.yaml"
    policy.write_text(HEAD + "budgets: []\nqueue: {max_wait_s: 5}\n")
    root = Path(__file__).parent.parent.parent
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "authz",
            "check-config",
            str(policy),
            "--envoy",
            str(root / "envoy" / "envoy.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "times out after 1s but queue.max_wait_s is 5s" in out.stderr
