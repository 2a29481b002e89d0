"""Issue 16: a policy reload mid-window keeps what was spent, for each kind of edit
(amount, match, name with ``renamed_from``, timezone); audit-only budgets and rollover
through the enforcer. The same on every ledger: tests/contract/test_budget_semantics_contract.py.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from authz.clock import FakeClock
from authz.decision import DenyReason
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

HEAD = """
version: 1
timezone: {tz}
identity:
  api_keys:
    - {{name: a, sha256: {ka}, claims: {{org_id: acme, department: research, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: user, claim: sub}}]
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""
KA = hashlib.sha256(b"ka").hexdigest()
DAILY = "budgets: [{{name: {name}, match: {match}, tokens: {tokens}, period: day{extra}}}]\n"
DEPT = "{department: research}"


def policy(tz: str = "UTC", name: str = "daily", match: str = DEPT, tokens: int = 1000,
           extra: str = "") -> str:  # fmt: skip
    return HEAD.format(tz=tz, ka=KA) + DAILY.format(
        name=name, match=match, tokens=tokens, extra=extra
    )


def req(max_tokens: int = 10) -> CheckInput:
    body = {"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return CheckInput("POST", "/v1/chat/completions", {"authorization": "Bearer ka"},
                      json.dumps(body).encode())  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 3, 3, 10, 0, tzinfo=ZoneInfo("UTC")).timestamp())


class Env:
    def __init__(self, path: Path, clock: FakeClock, text: str) -> None:
        path.write_text(text)
        self.path, self.store = path, PolicyStore(path)
        self.enf = Enforcer(self.store, MemoryLedger(clock), clock)

    def reload(self, text: str) -> None:
        self.path.write_text(text)
        assert self.store.reload()

    async def spend(self, tokens: int) -> None:
        d = await self.enf.check(req(1))
        assert d.reservation_id, d.message
        await self.enf.settle(d.reservation_id, TokenUsage(tokens, 0, 0))

    async def remaining(self) -> int:
        """What is left after a probe of 1 output token (which it then gives back)."""
        d = await self.enf.check(req(1))
        assert d.reservation_id and d.quota is not None, d.message
        await self.enf.release(d.reservation_id)
        return d.quota.remaining + d.input_estimate + 1


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param({"tokens": 2000}, id="amount"),
        pytest.param({"match": "{org: acme, department: '*'}"}, id="match"),
        pytest.param({"name": "research-daily", "extra": ", renamed_from: daily"}, id="name"),
        pytest.param({"tz": "Asia/Tokyo"}, id="timezone"),
        pytest.param(
            {"tz": "America/New_York", "name": "d2", "extra": ", renamed_from: daily"},
            id="name-and-timezone",
        ),
    ],
)
async def test_a_reload_mid_window_keeps_what_was_spent(
    tmp_path: Path, clock: FakeClock, edit: dict[str, object]
) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy())
    await env.spend(300)
    env.reload(policy(**edit))  # type: ignore[arg-type]
    amount = int(edit.get("tokens", 1000))  # type: ignore[call-overload]
    assert await env.remaining() == amount - 300
    await env.spend(100)
    assert await env.remaining() == amount - 400  # counted once, in one counter


async def test_a_rename_without_renamed_from_is_a_new_budget(
    tmp_path: Path, clock: FakeClock
) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy())
    await env.spend(300)
    env.reload(policy(name="other"))
    assert await env.remaining() == 1000


async def test_after_a_timezone_change_the_next_window_starts_afresh(
    tmp_path: Path, clock: FakeClock
) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy())
    await env.spend(300)
    env.reload(policy(tz="Asia/Tokyo"))  # 19:00 in Tokyo: its day ends at 15:00 UTC
    await env.spend(100)
    clock.advance(5 * 3600 + 60)  # 15:01 UTC, still 3 March in UTC
    assert await env.remaining() == 1000


async def test_renamed_from_is_harmless_in_later_windows(tmp_path: Path, clock: FakeClock) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy())
    await env.spend(300)
    env.reload(policy(name="n", extra=", renamed_from: daily"))
    clock.advance(86400)
    assert await env.remaining() == 1000


async def test_an_audit_only_budget_counts_warns_and_never_refuses(
    tmp_path: Path, clock: FakeClock
) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy(tokens=100, extra=", enforce: false"))
    await env.spend(95)
    d = await env.enf.check(req(50))
    assert d.allowed and d.reservation_id and d.quota is None
    assert d.warnings and d.warnings[0].startswith(
        "audit-only budget 'daily' for org:acme/department:research would have refused"
    )
    await env.enf.settle(d.reservation_id, TokenUsage(20, 0, 30))
    limit = env.enf.limits_for(env.enf.policy, d.subject)[0]  # type: ignore[arg-type]
    assert (await env.enf._ledger.balance(limit)).used == 145  # counted all the same
    ok = await env.enf.check(req(1))
    assert ok.allowed and ok.reason is not DenyReason.BUDGET_EXHAUSTED


async def test_rollover_carries_the_unused_part_capped(tmp_path: Path, clock: FakeClock) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy(tokens=1000, extra=", rollover: {max: 25%}"))
    await env.spend(900)
    clock.advance(86400)
    assert await env.remaining() == 1000 + 100
    await env.spend(100)  # 1000 of its nominal unused: carried up to 250
    clock.advance(86400)
    assert await env.remaining() == 1000 + 250


async def test_a_rename_is_applied_once_and_later_edits_continue_the_new_counter(
    tmp_path: Path, clock: FakeClock
) -> None:
    env = Env(tmp_path / "p.yaml", clock, policy())
    await env.spend(300)
    env.reload(policy(tz="Asia/Tokyo", name="n", extra=", renamed_from: daily"))
    await env.spend(100)
    clock.advance(60)
    # Back to UTC, renamed_from still in the file: the Tokyo window of "n" goes on (the
    # rename was applied by the last reload), not the UTC window of "daily".
    env.reload(policy(name="n", extra=", renamed_from: daily"))
    assert env.store.current.budgets[0].renamed_from is None
    assert await env.remaining() == 1000 - 400
    await env.spend(50)
    assert await env.remaining() == 1000 - 450
