"""The breaker around a ledger: every transition, every mode, on a fake clock.

The inner ledger is a MemoryLedger behind a FlakyLedger that can be made unreachable
("down"), unresponsive ("hang": calls time out) or answer-losing ("late").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.errors import LedgerUnavailable
from authz.ledger import Limit, MemoryLedger, Refusal, Reservation
from authz.ledger.breaker import BreakerLedger, BreakerState
from authz.ledger.journal import Journal
from authz.policy.ledger_settings import BreakerSettings
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.support.flaky_ledger import FlakyLedger

pytestmark = pytest.mark.unit

FAST = BreakerSettings(failures=3, window_s=10, open_s=5, call_timeout_s=0.01)
Env = tuple[BreakerLedger, FlakyLedger, FakeClock]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Env]]:
    made: list[BreakerLedger] = []
    clock = FakeClock()
    real = MemoryLedger(clock)

    def build(settings: BreakerSettings = FAST, max_bytes: int = 1 << 20) -> Env:
        inner = FlakyLedger(real)
        journal = Journal.open(tmp_path / "state" / "journal.jsonl", max_bytes)
        breaker = BreakerLedger(inner, settings, clock, journal)
        made.append(breaker)
        return breaker, inner, clock

    yield build
    for b in made:
        b.inner.fault = None  # type: ignore[attr-defined]
        await b.close()


def lim(clock: FakeClock, key: str = "user|u", amount: int = 1000) -> Limit:
    return Limit(key, key.split("|")[0], key, amount, clock.now() + 86400, Weights(output=2))


def tok(i: int, o: int = 0) -> TokenUsage:
    return TokenUsage(i, 0, o)


async def reserve(
    b: BreakerLedger, clock: FakeClock, rid: str, *limits: Limit, n: int = 10
) -> Reservation | Refusal:
    return await b.reserve(
        rid, limits or (lim(clock),), tok(n), deadline=clock.now() + 60, expiry_charge=tok(n)
    )


async def trip(b: BreakerLedger, inner: FlakyLedger, clock: FakeClock) -> None:
    """Three failed reserves (on a limit of their own): the breaker opens."""
    inner.fault = "down"
    for i in range(3):
        with contextlib.suppress(LedgerUnavailable):
            await reserve(b, clock, f"trip{i}", lim(clock, "trip|t"))
    await asyncio.sleep(0)  # let the journaled releases of those reserves start
    assert b.snapshot().state is BreakerState.OPEN


# -- transitions ---------------------------------------------------------------------


async def test_opens_after_n_failures_in_a_row(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    inner.fault = "down"
    for i in range(2):
        with pytest.raises(LedgerUnavailable):
            await reserve(b, clock, f"r{i}")
    assert b.snapshot().state is BreakerState.CLOSED and b.snapshot().failures == 2
    with pytest.raises(LedgerUnavailable, match="fail_closed"):
        await reserve(b, clock, "r2")
    snap = b.snapshot()
    assert snap.state is BreakerState.OPEN and snap.opened == 1
    assert snap.retry_at == clock.now() + 5 and "connection refused" in snap.last_error


async def test_failures_spread_beyond_the_window_do_not_open(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    inner.fault = "down"
    for i in range(5):
        with pytest.raises(LedgerUnavailable):
            await reserve(b, clock, f"r{i}")
        clock.advance(6)  # only two failures ever lie within 10 s
    assert b.snapshot().state is BreakerState.CLOSED


async def test_a_success_ends_the_run_of_failures(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    for i in range(4):
        inner.fault = "down"
        for j in range(2):
            with pytest.raises(LedgerUnavailable):
                await reserve(b, clock, f"f{i}{j}")
        inner.fault = None
        assert isinstance(await reserve(b, clock, f"ok{i}"), Reservation)
    assert b.snapshot().state is BreakerState.CLOSED


async def test_timeouts_count_as_failures(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    inner.fault = "hang"
    for i in range(3):
        with pytest.raises(LedgerUnavailable, match="no answer within 10 ms"):
            await reserve(b, clock, f"r{i}")
    assert b.snapshot().state is BreakerState.OPEN


async def test_the_timeout_holds_even_if_the_store_ignores_cancellation(
    make: Callable[..., Env],
) -> None:
    b, inner, clock = make()
    inner.fault = "deaf"
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(LedgerUnavailable, match="no answer within 10 ms"):
        await reserve(b, clock, "r")
    assert loop.time() - start < 0.5  # the deaf call is abandoned, not awaited
    inner.unblock.set()
    await asyncio.sleep(0)


async def test_a_refusal_is_an_answer_not_a_failure(make: Callable[..., Env]) -> None:
    b, _, clock = make()
    small = lim(clock, "user|tiny", 5)
    for i in range(10):
        assert isinstance(await reserve(b, clock, f"r{i}", small), Refusal)
    assert b.snapshot().state is BreakerState.CLOSED and b.snapshot().failures == 0


async def test_open_keeps_calls_from_the_store_until_the_cool_down(
    make: Callable[..., Env],
) -> None:
    b, inner, clock = make()
    await trip(b, inner, clock)
    inner.fault = None
    before = inner.calls
    clock.advance(4)
    with pytest.raises(LedgerUnavailable, match="breaker open"):
        await reserve(b, clock, "x")
    assert inner.calls == before and b.snapshot().rejected == 1
    clock.advance(1)
    assert b.snapshot().state is BreakerState.HALF_OPEN


async def test_half_open_lets_one_probe_through_then_closes(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    await trip(b, inner, clock)
    clock.advance(5)
    inner.fault = "late"  # the probe's answer is slow to come
    probe = asyncio.ensure_future(reserve(b, clock, "probe"))
    await asyncio.sleep(0)
    calls = inner.calls
    with pytest.raises(LedgerUnavailable, match="breaker half_open"):
        await reserve(b, clock, "second")  # rejected: the probe is out
    assert inner.calls == calls
    with pytest.raises(LedgerUnavailable):
        await probe  # timed out: the probe failed
    assert b.snapshot().state is BreakerState.OPEN and b.snapshot().opened == 2
    clock.advance(5)
    inner.fault = None
    assert isinstance(await reserve(b, clock, "probe2"), Reservation)
    assert b.snapshot().state is BreakerState.CLOSED


async def test_failed_probe_restarts_the_cool_down(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    await trip(b, inner, clock)
    clock.advance(7)
    with pytest.raises(LedgerUnavailable):
        await reserve(b, clock, "probe")
    snap = b.snapshot()
    assert snap.state is BreakerState.OPEN and snap.retry_at == clock.now() + 5


async def test_a_cancelled_probe_frees_the_probe_slot(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    await trip(b, inner, clock)
    clock.advance(5)
    inner.fault = "hang"
    b.configure(replace(FAST, call_timeout_s=10))
    probe = asyncio.ensure_future(reserve(b, clock, "probe"))
    await asyncio.sleep(0)
    probe.cancel()  # Envoy gave up on the Check
    with pytest.raises(asyncio.CancelledError):
        await probe
    inner.fault = None
    assert isinstance(await reserve(b, clock, "next"), Reservation)
    assert b.snapshot().state is BreakerState.CLOSED


async def test_one_log_line_per_state_change(
    make: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    b, inner, clock = make()
    with caplog.at_level(logging.INFO, logger="authz.breaker"):
        await trip(b, inner, clock)
        for i in range(5):
            with pytest.raises(LedgerUnavailable):
                await reserve(b, clock, f"open{i}")
        clock.advance(5)
        inner.fault = None
        await reserve(b, clock, "probe")
    changes = [r for r in caplog.records if "ledger breaker" in r.getMessage()]
    assert [(r.previous, r.breaker) for r in changes] == [  # type: ignore[attr-defined]
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert changes[0].levelno == logging.WARNING


# -- modes -------------------------------------------------------------------------


async def test_fail_closed_raises_without_touching_the_store(make: Callable[..., Env]) -> None:
    b, inner, clock = make(FAST)
    await trip(b, inner, clock)
    calls = inner.calls
    with pytest.raises(LedgerUnavailable, match=r"quota store unreachable \(breaker open\)"):
        await reserve(b, clock, "r")
    assert inner.calls == calls


async def test_fail_open_admits_locally_and_charges_on_recovery(make: Callable[..., Env]) -> None:
    b, inner, clock = make(replace(FAST, mode="fail_open"))
    user = lim(clock)
    await trip(b, inner, clock)
    calls = inner.calls
    res = await reserve(b, clock, "r1", user, n=5000)  # more than the budget: fail_open
    assert isinstance(res, Reservation) and res.id == "local:r1" and inner.calls == calls
    assert (await b.settle("local:r1", tok(30, 10))).settled
    assert not (await b.settle("local:r1", tok(30, 10))).settled  # idempotent here too
    assert b.snapshot().journal_entries >= 1
    clock.advance(5)
    inner.fault = None
    await reserve(b, clock, "probe", lim(clock, "other|o"))  # closes
    await b.drain()
    assert (await inner.real.balance(user)).used == 50  # 30 + 2 * 10
    assert b.snapshot().journal_entries == 0


async def test_local_allowance_caps_each_limit_per_replica(make: Callable[..., Env]) -> None:
    b, inner, clock = make(replace(FAST, mode="local_allowance", local_allowance_units=100))
    org, user = lim(clock, "org|a", 10_000), lim(clock, "user|u", 10_000)
    await trip(b, inner, clock)
    for i in range(4):
        res = await reserve(b, clock, f"r{i}", org, user, n=25)
        assert isinstance(res, Reservation) and res.remaining == (100 - 25 * (i + 1),) * 2
    out = await reserve(b, clock, "r4", org, user, n=1)
    assert isinstance(out, Refusal) and out.limit.key == "org|a"
    assert out.remaining == 0 and out.requested == 1 and out.retry_after_s == 5
    # settling for less than was held gives the allowance back, as a ledger would
    await b.settle("local:r0", tok(5))
    assert isinstance(await reserve(b, clock, "r5", org, user, n=20), Reservation)
    snap = b.snapshot()
    # (the three failed calls of trip() were admitted locally too)
    assert (snap.local_admitted, snap.local_refused, snap.local_open) == (3 + 5, 1, 3 + 4)


async def test_local_allowance_never_exceeds_the_budget(make: Callable[..., Env]) -> None:
    b, inner, clock = make(replace(FAST, mode="local_allowance", local_allowance_units=100))
    await trip(b, inner, clock)
    out = await reserve(b, clock, "r", lim(clock, "user|u", 40), n=41)
    assert isinstance(out, Refusal) and out.remaining == 40


async def test_local_allowance_starts_again_when_the_breaker_closes(
    make: Callable[..., Env],
) -> None:
    b, inner, clock = make(replace(FAST, mode="local_allowance", local_allowance_units=10))
    user = lim(clock)
    await trip(b, inner, clock)
    assert isinstance(await reserve(b, clock, "a", user, n=10), Reservation)
    assert isinstance(await reserve(b, clock, "b", user, n=1), Refusal)
    clock.advance(5)
    inner.fault = None
    await reserve(b, clock, "probe", user, n=1)
    await trip(b, inner, clock)
    assert isinstance(await reserve(b, clock, "c", user, n=10), Reservation)


async def test_a_failed_call_while_closed_is_answered_by_the_mode(make: Callable[..., Env]) -> None:
    b, inner, clock = make(replace(FAST, mode="fail_open"))
    inner.fault = "down"
    res = await reserve(b, clock, "r")
    assert isinstance(res, Reservation) and res.id == "local:r"
    assert b.snapshot().state is BreakerState.CLOSED


async def test_a_hold_taken_before_the_timeout_is_released(make: Callable[..., Env]) -> None:
    b, inner, clock = make(replace(FAST, mode="fail_open"))
    user = lim(clock)
    inner.fault = "late"  # the store holds 10 units, the answer is lost
    res = await reserve(b, clock, "r", user)
    assert isinstance(res, Reservation) and res.id == "local:r"
    assert (await inner.real.balance(user)).reserved == 10
    inner.fault = None
    await b.settle(res.id, tok(7))
    await b.drain()
    bal = await inner.real.balance(user)
    assert (bal.reserved, bal.used) == (0, 7)  # released, and charged once (locally)


async def test_settlements_while_open_are_replayed_once(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    user = lim(clock)
    for i in range(3):
        assert isinstance(await reserve(b, clock, f"r{i}", user), Reservation)
    await trip(b, inner, clock)
    for i in range(3):
        assert (await b.settle(f"r{i}", tok(4, 1))).settled  # journaled
    assert b.snapshot().journal_entries == 6  # 3 releases of the trip + 3 settlements
    clock.advance(5)
    inner.fault = None
    await reserve(b, clock, "probe", lim(clock, "other|o"))
    await b.drain()
    bal = await inner.real.balance(user)
    assert (bal.used, bal.reserved) == (18, 0)
    assert b.snapshot().replayed_entries == 6 and b.snapshot().replays == 1


async def test_expired_local_holds_are_charged_their_expiry_amount(
    make: Callable[..., Env],
) -> None:
    b, inner, clock = make(replace(FAST, mode="fail_open"))
    user = lim(clock)
    await trip(b, inner, clock)
    await reserve(b, clock, "r", user, n=9)
    clock.advance(61)
    inner.fault = None
    assert await b.expire(clock.now()) >= 1  # also the probe: the sweep closes the breaker
    await b.drain()
    assert (await inner.real.balance(user)).used == 9
    assert not (await b.settle("local:r", tok(1))).settled


async def test_stopping_charges_open_local_holds(make: Callable[..., Env]) -> None:
    b, inner, clock = make(replace(FAST, mode="fail_open"))
    user = lim(clock)
    await trip(b, inner, clock)
    await reserve(b, clock, "r", user, n=9)
    clock.advance(5)
    inner.fault = None
    await b.close()  # the hold goes to the store (closed breaker: a probe) or the journal
    assert (await inner.real.balance(user)).used == 9


async def test_snapshot_is_a_plain_dict_for_readyz(make: Callable[..., Env]) -> None:
    b, inner, clock = make()
    await trip(b, inner, clock)
    d = b.snapshot().as_dict()
    assert d["state"] == "open" and d["mode"] == "fail_closed" and d["journal_entries"] == 3


async def test_a_reloaded_policy_changes_the_mode_at_once(
    make: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    b, inner, clock = make()
    await trip(b, inner, clock)
    with pytest.raises(LedgerUnavailable):
        await reserve(b, clock, "r1")
    with caplog.at_level(logging.WARNING, logger="authz.breaker"):
        b.configure(replace(FAST, mode="fail_open", journal_path="/elsewhere.jsonl"))
    assert "apply at the next start" in caplog.text
    res = await reserve(b, clock, "r2")
    assert isinstance(res, Reservation) and res.id == "local:r2"
    assert b.snapshot().mode == "fail_open" and b.journal.path.name == "journal.jsonl"
