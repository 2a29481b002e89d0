"""One contract for every ledger backend; a new backend adds itself to LEDGERS.

Redis backends run against real servers started once per session (tests/conftest.py),
emptied before each test: one redis-server and a 3-master Redis Cluster, each with
edge leases off (every call is one script) and on (the default: checks decided from
leases, batched flushes). Missing Redis binaries fail these tests, never skip them.
"""

from __future__ import annotations

import asyncio

from authz.clock import FakeClock
from authz.ledger import Ledger, Limit, Refusal, Reservation
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.contract.backends import ONE, lim, tok


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


# -- limits that count requests, open requests, and carry a burst's debt --------------


async def test_per_request_units_count_requests(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    rpm = Limit("rpm|org:a|0", "rpm", "org:a", 2, clock.now() + 60, Weights(0, 0, 0), per_request=1)
    for i in range(2):
        out = await ledger.reserve(
            f"q{i}", (rpm,), tok(500, 500), deadline=clock.now() + 60, expiry_charge=tok(0)
        )
        assert isinstance(out, Reservation) and out.units == (1,)
        await ledger.settle(f"q{i}", tok(10, 10))
    refused = await ledger.reserve(
        "q3", (rpm,), tok(1), deadline=clock.now() + 60, expiry_charge=tok(0)
    )
    assert isinstance(refused, Refusal) and refused.remaining == 0
    assert (await ledger.balance(rpm)).used == 2


async def test_release_on_settle_frees_the_slot(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    conc = Limit(
        "conc|org:a|c",
        "conc",
        "org:a",
        1,
        clock.now() + 600,
        Weights(0, 0, 0),
        per_request=1,
        release_on_settle=True,
    )
    await ledger.reserve("c1", (conc,), tok(5), deadline=clock.now() + 60, expiry_charge=tok(5))
    assert isinstance(
        await ledger.reserve(
            "c2", (conc,), tok(5), deadline=clock.now() + 60, expiry_charge=tok(5)
        ),
        Refusal,
    )
    await ledger.settle("c1", tok(5, 5))
    assert (await ledger.balance(conc)).used == 0
    assert isinstance(
        await ledger.reserve(
            "c3", (conc,), tok(5), deadline=clock.now() + 60, expiry_charge=tok(5)
        ),
        Reservation,
    )
    clock.advance(61)
    assert await ledger.expire(clock.now()) == 1  # an expired hold frees the slot too
    bal = await ledger.balance(conc)
    assert (bal.used, bal.reserved) == (0, 0)


async def test_burst_debt_carries_into_next_window(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    day1 = Limit("b|org:a|1", "b", "org:a", 150, clock.now() + 100, ONE, nominal=100)
    await ledger.reserve("d1", (day1,), tok(140), deadline=clock.now() + 50, expiry_charge=tok(0))
    await ledger.settle("d1", tok(140))
    clock.advance(101)
    day2 = Limit(
        "b|org:a|2", "b", "org:a", 150, clock.now() + 100, ONE, carry_from="b|org:a|1", nominal=100
    )
    out = await ledger.reserve(
        "d2", (day2,), tok(10), deadline=clock.now() + 50, expiry_charge=tok(0)
    )
    assert isinstance(out, Reservation) and out.remaining == (150 - 40 - 10,)


# -- charge: usage that happened without a reservation (journal replay) -----------------


async def test_charge_adds_weighted_usage_once(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    heavy = lim("org|a", 10_000, clock, Weights(input=1, cached_input=0.5, output=4))
    plain = lim("user|u", 10_000, clock)
    assert await ledger.charge("local:c1", (heavy, plain), TokenUsage(7, 4, 5)) is True
    assert await ledger.charge("local:c1", (heavy, plain), TokenUsage(7, 4, 5)) is False
    assert (await ledger.balance(heavy)).used == 29 and (await ledger.balance(plain)).used == 16
    assert (await ledger.balance(plain)).reserved == 0


async def test_charge_is_never_refused_and_counts_against_later_reserves(
    env: tuple[Ledger, FakeClock],
) -> None:
    ledger, clock = env
    org = lim("org|a", 10, clock)
    assert await ledger.charge("local:c1", (org,), tok(50))
    assert (await ledger.balance(org)).used == 50
    out = await ledger.reserve(
        "r1", (org,), tok(1), deadline=clock.now() + 60, expiry_charge=tok(0)
    )
    assert isinstance(out, Refusal) and out.remaining == 0


async def test_charge_leaves_what_a_settle_would(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    rpm = Limit(
        "rpm|org:a|0", "rpm", "org:a", 100, clock.now() + 60, Weights(0, 0, 0), per_request=1
    )
    conc = Limit("conc|org:a|c", "conc", "org:a", 5, clock.now() + 60, Weights(0, 0, 0),
                 per_request=1, release_on_settle=True)  # fmt: skip
    assert await ledger.charge("local:c1", (rpm, conc), tok(500, 500))
    assert (await ledger.balance(rpm)).used == 1
    assert (await ledger.balance(conc)).used == 0


async def test_concurrent_charges_of_one_id_count_once(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 10_000, clock)
    results = await asyncio.gather(
        *(ledger.charge("local:same", (org,), tok(10)) for _ in range(20))
    )
    assert results.count(True) == 1
    assert (await ledger.balance(org)).used == 10


async def test_charge_ids_and_reservation_ids_do_not_collide(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 10_000, clock)
    await ledger.reserve("x1", (org,), tok(100), deadline=clock.now() + 60, expiry_charge=tok(0))
    assert await ledger.charge("x1", (org,), tok(5))
    assert (await ledger.settle("x1", tok(7))).settled
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (12, 0)


# -- the ids and nodes the enforcer makes: "<32 hex>@<org>", paths from "org:<name>" -----


async def test_enforcer_shaped_ids_and_paths(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = Limit("org-day|org:acme|0", "org-day", "org:acme", 1000, clock.now() + 3600, ONE)
    user = Limit("user-day|org:acme/team:nlp/user:u|0", "user-day", "org:acme/team:nlp/user:u",
                 100, clock.now() + 3600, ONE)  # fmt: skip
    other = Limit("org-day|org:beta|0", "org-day", "org:beta", 1000, clock.now() + 3600, ONE)
    rid, rid_beta = f"{7:032x}@acme", f"{8:032x}@beta"
    res = await ledger.reserve(rid, (org, user), tok(60), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(res, Reservation) and res.remaining == (940, 40)
    beta = await ledger.reserve(rid_beta, (other,), tok(5), deadline=clock.now() + 60,
                                expiry_charge=tok(0))  # fmt: skip
    assert isinstance(beta, Reservation)
    assert (await ledger.settle(rid, tok(30))).settled
    assert (await ledger.settle(rid_beta, tok(5))).settled
    assert not (await ledger.settle(rid, tok(30))).settled
    assert ((await ledger.balance(user)).used, (await ledger.balance(org)).used) == (30, 30)
    assert (await ledger.balance(other)).used == 5
