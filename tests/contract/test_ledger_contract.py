"""One contract for every ledger backend; a new backend adds itself to LEDGERS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from authz.clock import FakeClock
from authz.ledger import Ledger, Limit, MemoryLedger, Refusal, Reservation
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

LEDGERS: dict[str, Callable[[FakeClock], Ledger]] = {"memory": MemoryLedger}
ONE = Weights()


@pytest.fixture(params=sorted(LEDGERS))
async def env(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Ledger, FakeClock]]:
    clock = FakeClock()
    ledger = LEDGERS[request.param](clock)
    yield ledger, clock
    await ledger.close()


def lim(
    key: str, amount: int, clock: FakeClock, weights: Weights = ONE, window: float = 3600
) -> Limit:
    return Limit(key, key.split("|")[0], key, amount, clock.now() + window, weights)


def tok(i: int, o: int = 0, c: int = 0) -> TokenUsage:
    return TokenUsage(i, c, o)


async def test_reserve_holds_on_every_limit(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org, user = lim("org|a", 1000, clock), lim("user|a/u", 100, clock)
    res = await ledger.reserve(
        "r1", (org, user), tok(30, 20), deadline=clock.now() + 60, expiry_charge=tok(30)
    )
    assert isinstance(res, Reservation)
    assert res.units == (50, 50) and res.remaining == (950, 50)
    assert (await ledger.balance(org)).reserved == 50
    assert (await ledger.balance(user)).remaining == 50


async def test_all_or_nothing_names_first_exhausted(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org, dept, user = (
        lim("org|a", 100, clock),
        lim("dept|a/d", 1000, clock),
        lim("user|u", 1000, clock),
    )
    await ledger.reserve("r1", (org,), tok(90), deadline=clock.now() + 60, expiry_charge=tok(0))
    out = await ledger.reserve(
        "r2", (dept, org, user), tok(20), deadline=clock.now() + 60, expiry_charge=tok(0)
    )
    assert isinstance(out, Refusal)
    assert out.limit.key == "org|a" and out.requested == 20 and out.remaining == 10
    # nothing was held on the limits that had room
    assert (await ledger.balance(dept)).reserved == 0
    assert (await ledger.balance(user)).reserved == 0


async def test_settle_replaces_reservation_and_is_idempotent(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 1000, clock)
    await ledger.reserve(
        "r1", (org,), tok(100, 400), deadline=clock.now() + 60, expiry_charge=tok(100)
    )
    first = await ledger.settle("r1", tok(80, 20))
    second = await ledger.settle("r1", tok(80, 20))
    assert first.settled and not second.settled
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (100, 0)


async def test_settle_unknown_is_a_noop(env: tuple[Ledger, FakeClock]) -> None:
    ledger, _ = env
    assert not (await ledger.settle("never", tok(5))).settled


async def test_weights_apply_per_limit(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    heavy = lim("org|a", 10_000, clock, Weights(input=1, cached_input=0.5, output=4))
    plain = lim("user|u", 10_000, clock)
    res = await ledger.reserve(
        "r1", (heavy, plain), tok(10, 10, 3), deadline=clock.now() + 60, expiry_charge=tok(0)
    )
    assert isinstance(res, Reservation) and res.units == (52, 23)  # 10 + 1.5 -> 2 (ceil) + 40
    await ledger.settle("r1", TokenUsage(7, 4, 5))
    assert (await ledger.balance(heavy)).used == 29 and (await ledger.balance(plain)).used == 16


async def test_expiry_charges_policy_amount(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 1000, clock)
    await ledger.reserve(
        "r1", (org,), tok(100, 400), deadline=clock.now() + 60, expiry_charge=tok(100)
    )
    assert await ledger.expire(clock.now() + 59) == 0
    clock.advance(61)
    assert await ledger.expire(clock.now()) == 1
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (100, 0)
    assert await ledger.expire(clock.now()) == 0


async def test_late_settle_after_expiry_corrects_charge(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 1000, clock)
    await ledger.reserve(
        "r1", (org,), tok(100, 400), deadline=clock.now() + 60, expiry_charge=tok(100)
    )
    clock.advance(61)
    await ledger.expire(clock.now())
    out = await ledger.settle("r1", tok(100, 50))
    assert out.settled and out.late
    assert (await ledger.balance(org)).used == 150
    assert not (await ledger.settle("r1", tok(100, 50))).settled
    assert (await ledger.balance(org)).used == 150


async def test_new_window_is_a_new_counter(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    day1 = lim("user|u|100", 100, clock, window=10)
    await ledger.reserve("r1", (day1,), tok(100), deadline=clock.now() + 5, expiry_charge=tok(100))
    assert isinstance(
        await ledger.reserve("r2", (day1,), tok(1), deadline=clock.now() + 5, expiry_charge=tok(1)),
        Refusal,
    )
    await ledger.settle("r1", tok(100))
    clock.advance(11)
    day2 = lim("user|u|200", 100, clock, window=10)
    assert isinstance(
        await ledger.reserve(
            "r3", (day2,), tok(100), deadline=clock.now() + 5, expiry_charge=tok(1)
        ),
        Reservation,
    )


async def test_concurrent_reservations_never_overshoot(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 1000, clock)

    async def one(i: int) -> Reservation | Refusal:
        return await ledger.reserve(
            f"r{i}", (org,), tok(100), deadline=clock.now() + 60, expiry_charge=tok(0)
        )

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(isinstance(r, Reservation) for r in results) == 10
    assert (await ledger.balance(org)).reserved == 1000


async def test_request_larger_than_budget_refused(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 10, clock)
    out = await ledger.reserve(
        "r1", (org,), tok(11), deadline=clock.now() + 60, expiry_charge=tok(0)
    )
    assert isinstance(out, Refusal) and out.remaining == 10
