"""Issue 16 on every ledger: edits keep what was spent (a counter that inherits its old
counter), audit-only limits (counted, never refused) and rollover (the unused part of a
window opens the next one as a credit, capped). Same assertions on memory, SQLite, Redis
and Redis Cluster, with edge leases off and on.
"""

from __future__ import annotations

from authz.clock import FakeClock
from authz.ledger import Ledger, Limit, Refusal, Reservation
from tests.contract.backends import ONE, tok


def _lim(key: str, amount: int, clock: FakeClock, **kw: object) -> Limit:
    return Limit(key, key.split("|")[0], "org:a", amount, clock.now() + 3600, ONE, **kw)  # type: ignore[arg-type]


async def _spend(ledger: Ledger, rid: str, limit: Limit, clock: FakeClock, units: int) -> None:
    out = await ledger.reserve(rid, (limit,), tok(units), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation)
    assert (await ledger.settle(rid, tok(units))).settled


# -- edits keep what was spent -----------------------------------------------------------


async def test_a_renamed_counter_opens_with_what_the_old_one_spent_and_holds(
    env: tuple[Ledger, FakeClock],
) -> None:
    ledger, clock = env
    old = _lim("team-daily|org:a|0", 1000, clock)
    await _spend(ledger, "r1", old, clock, 300)
    held = await ledger.reserve("r2", (old,), tok(100), deadline=clock.now() + 60,
                                expiry_charge=tok(0))  # fmt: skip
    assert isinstance(held, Reservation)
    new = _lim("daily|org:a|0", 1000, clock, inherit="team-daily|org:a|0")
    out = await ledger.reserve("r3", (new,), tok(10), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    # What was spent (300) and what is held (100, as spent until it settles) go on.
    assert isinstance(out, Reservation) and out.remaining == (1000 - 300 - 100 - 10,)
    # The hold settles where it was taken, and the new counter follows: counted once.
    await ledger.settle("r2", tok(40))
    await ledger.settle("r3", tok(10))
    bal = await ledger.balance(new)
    assert (bal.used + bal.reserved, bal.remaining) == (350, 650)


async def test_the_old_counter_keeps_counting_into_the_new_one(
    env: tuple[Ledger, FakeClock],
) -> None:
    ledger, clock = env
    old = _lim("b|org:a|0", 1000, clock)
    await _spend(ledger, "r1", old, clock, 200)
    new = _lim("b|org:a|7", 1000, clock, inherit="b|org:a|0")
    await _spend(ledger, "r2", new, clock, 5)
    # A replica that has not reloaded yet still spends on the old counter: counted here.
    await _spend(ledger, "r3", old, clock, 50)
    assert (await ledger.balance(new)).remaining == 1000 - 200 - 5 - 50


async def test_an_inherited_counter_never_used_opens_empty(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    new = _lim("b|org:a|7", 100, clock, inherit="gone|org:a|7")
    out = await ledger.reserve("r1", (new,), tok(100), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation) and out.remaining == (0,)


async def test_an_inherited_spend_counts_against_the_amount(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    old = _lim("b|org:a|0", 100, clock)
    await _spend(ledger, "r1", old, clock, 90)
    new = _lim("c|org:a|0", 100, clock, inherit="b|org:a|0")
    out = await ledger.reserve("r2", (new,), tok(20), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Refusal) and out.remaining == 10


async def test_a_charge_opens_an_inherited_counter_too(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    old = _lim("b|org:a|0", 1000, clock)
    await _spend(ledger, "r1", old, clock, 70)
    new = _lim("c|org:a|0", 1000, clock, inherit="b|org:a|0")
    assert await ledger.charge("ch1", (new,), tok(5))
    assert (await ledger.balance(new)).used == 75


# -- audit-only limits ----------------------------------------------------------------------


async def test_an_audit_only_limit_counts_but_never_refuses(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    audit = _lim("watch|org:a|0", 100, clock, enforce=False)
    hard = _lim("hard|org:a|0", 1000, clock)
    out = await ledger.reserve("r1", (audit, hard), tok(150), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation)
    assert out.remaining == (-50, 850)  # past its amount, said so: the warning reads it
    await ledger.settle("r1", tok(120))
    bal = await ledger.balance(audit)
    assert (bal.used, bal.reserved, bal.remaining) == (120, 0, 0)
    # The enforced limit beside it still refuses, all or nothing.
    refused = await ledger.reserve("r2", (audit, hard), tok(900), deadline=clock.now() + 60,
                                   expiry_charge=tok(0))  # fmt: skip
    assert isinstance(refused, Refusal) and refused.limit.key == "hard|org:a|0"
    assert (await ledger.balance(audit)).reserved == 0


# -- rollover ---------------------------------------------------------------------------


def _day(n: int, clock: FakeClock, rollover: int, amount: int = 100) -> Limit:
    carry = f"r|org:a|{n - 1}" if n > 1 else None
    return Limit(f"r|org:a|{n}", "r", "org:a", amount, clock.now() + 100, ONE,
                 carry_from=carry, nominal=100, rollover=rollover)  # fmt: skip


async def test_rollover_opens_the_next_window_with_the_unused_part_capped(
    env: tuple[Ledger, FakeClock],
) -> None:
    ledger, clock = env
    await _spend(ledger, "d1", _day(1, clock, 50), clock, 80)  # 20 unused: all carried
    clock.advance(101)
    out = await ledger.reserve("d2", (_day(2, clock, 50),), tok(10), deadline=clock.now() + 50,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation) and out.remaining == (100 + 20 - 10,)
    await ledger.settle("d2", tok(10))  # day 2 used 10 of its 120: 90 of its nominal unused
    clock.advance(101)
    day3 = _day(3, clock, 50)
    out = await ledger.reserve("d3", (day3,), tok(1), deadline=clock.now() + 50,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation) and out.remaining == (100 + 50 - 1,)  # capped at 50
    assert (await ledger.balance(day3)).remaining == 149


async def test_rollover_credit_is_spendable_past_the_amount(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    await _spend(ledger, "d1", _day(1, clock, 30), clock, 40)
    clock.advance(101)
    day2 = _day(2, clock, 30)
    await _spend(ledger, "d2", day2, clock, 130)
    out = await ledger.reserve("d3", (day2,), tok(1), deadline=clock.now() + 50,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Refusal) and out.remaining == 0


async def test_no_previous_window_carries_nothing(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    out = await ledger.reserve("d2", (_day(2, clock, 50),), tok(100), deadline=clock.now() + 50,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation) and out.remaining == (0,)


# -- a group's counter beside the tree's -------------------------------------------------


async def test_a_group_counter_is_held_with_the_tree_all_or_nothing(
    env: tuple[Ledger, FakeClock],
) -> None:
    """Two members in different departments share ``org:acme/group:apollo``: the same org
    (cluster slot) as their tree counters, so one reserve covers all of them."""
    ledger, clock = env

    def at(node: str, amount: int) -> Limit:
        name = node.rsplit("/", 1)[-1].split(":")[0]
        return Limit(f"{name}|{node}|0", name, node, amount, clock.now() + 3600, ONE)

    group = at("org:acme/group:apollo", 100)
    ann = (at("org:acme/department:research/user:ann", 1000), group)
    bob = (at("org:acme/department:sales/user:bob", 1000), group)
    a = await ledger.reserve(f"{1:032x}@acme", ann, tok(70), deadline=clock.now() + 60,
                             expiry_charge=tok(0))  # fmt: skip
    assert isinstance(a, Reservation) and a.remaining == (930, 30)
    b = await ledger.reserve(f"{2:032x}@acme", bob, tok(40), deadline=clock.now() + 60,
                             expiry_charge=tok(0))  # fmt: skip
    assert isinstance(b, Refusal) and b.limit.key == group.key and b.remaining == 30
    assert (await ledger.balance(bob[0])).reserved == 0  # nothing held on bob's own counter
    assert (await ledger.settle(f"{1:032x}@acme", tok(50))).settled
    c = await ledger.reserve(f"{3:032x}@acme", bob, tok(40), deadline=clock.now() + 60,
                             expiry_charge=tok(0))  # fmt: skip
    assert isinstance(c, Reservation) and c.remaining == (960, 10)
