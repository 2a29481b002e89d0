"""Absurd usage numbers reach every ledger the same way: clamped, closed, nothing open.

The response path bounds usage per request before a ledger sees it
(authz.usage.bounds.bound_usage); this is the ledger's own floor under that, for usage
that arrives another way (a journal replay, a direct call). Issue 9 finding 4: the memory
ledger charged ``10**18`` in full, Redis charged ``2**53 + 1`` in full and failed on
``10**18`` leaving the reservation open, with nothing logged.
"""

from __future__ import annotations

import pytest

from authz.clock import FakeClock
from authz.ledger import Ledger, Reservation
from authz.policy.model import Weights
from authz.usage.bounds import LEDGER_MAX_TOKENS
from authz.usage.types import TokenUsage
from tests.contract.backends import lim, tok

ABSURD = [10**18, 2**53 + 1, 2**63]
BIG = 10**13  # a budget no clamped settlement can exhaust


@pytest.mark.parametrize("huge", ABSURD, ids=["1e18", "2^53+1", "2^63"])
async def test_settle_clamps_to_ledger_maximum_and_closes(
    env: tuple[Ledger, FakeClock], huge: int
) -> None:
    ledger, clock = env
    org = lim("org|a", BIG, clock)
    res = await ledger.reserve(
        "r1", (org,), tok(100, 50), deadline=clock.now() + 60, expiry_charge=tok(100)
    )
    assert isinstance(res, Reservation)
    first = await ledger.settle("r1", TokenUsage(huge, huge, huge, huge))
    again = await ledger.settle("r1", tok(1))
    assert first.settled and not again.settled
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (3 * LEDGER_MAX_TOKENS, 0)
    clock.advance(120)
    assert await ledger.expire(clock.now()) == 0  # nothing left open to expire
    assert (await ledger.balance(org)).used == 3 * LEDGER_MAX_TOKENS


@pytest.mark.parametrize("huge", ABSURD, ids=["1e18", "2^53+1", "2^63"])
async def test_charge_clamps_to_ledger_maximum_once(
    env: tuple[Ledger, FakeClock], huge: int
) -> None:
    ledger, clock = env
    org = lim("org|a", BIG, clock, Weights(input=1, cached_input=0.25, output=4))
    assert await ledger.charge("c1", (org,), tok(huge, huge))
    assert not await ledger.charge("c1", (org,), tok(huge, huge))
    assert (await ledger.balance(org)).used == 5 * LEDGER_MAX_TOKENS


async def test_late_settle_after_expiry_is_clamped(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", BIG, clock)
    await ledger.reserve(
        "r1", (org,), tok(100, 50), deadline=clock.now() + 60, expiry_charge=tok(100)
    )
    clock.advance(61)
    assert await ledger.expire(clock.now()) == 1
    out = await ledger.settle("r1", tok(10**18))
    assert out.settled and out.late
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (LEDGER_MAX_TOKENS, 0)


async def test_absurd_reservation_is_clamped_alike(env: tuple[Ledger, FakeClock]) -> None:
    """A client's ``max_tokens: 10**18`` reaches reserve: every ledger holds the same."""
    ledger, clock = env
    org = lim("org|a", BIG, clock)
    res = await ledger.reserve(
        "r1", (org,), tok(10, 2**63), deadline=clock.now() + 60, expiry_charge=tok(10)
    )
    assert isinstance(res, Reservation) and res.units == (10 + LEDGER_MAX_TOKENS,)
    assert (await ledger.balance(org)).reserved == 10 + LEDGER_MAX_TOKENS
    await ledger.settle("r1", tok(10, 5))
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (15, 0)
