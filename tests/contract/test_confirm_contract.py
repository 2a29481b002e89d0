"""Tentative holds (authz.confirm) on every ledger that confirms; leases keep full holds.

A Check's hold starts short and free (deadline ``confirm_s`` away, expiry charge 0);
the gateway's ext_proc stream confirms it (deadline ``ttl_s``, the policy's expiry
charge). Unconfirmed, it is released at 0 (Envoy never used that answer); a settle
arriving after that still corrects the charge, exactly.
"""

from __future__ import annotations

from authz.clock import FakeClock
from authz.ledger import Ledger, Reservation
from tests.contract.backends import lim, tok


async def _tentative(ledger: Ledger, clock: FakeClock, rid: str) -> None:
    org = lim("org|a", 1000, clock)
    res = await ledger.reserve(
        rid, (org,), tok(100, 400), deadline=clock.now() + 10, expiry_charge=tok(0)
    )
    assert isinstance(res, Reservation)


async def test_unconfirmed_hold_is_released_at_zero(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    await _tentative(ledger, clock, "r1")
    clock.advance(11)
    assert await ledger.expire(clock.now()) == 1
    bal = await ledger.balance(lim("org|a", 1000, clock))
    assert (bal.used, bal.reserved) == (0, 0)


async def test_confirmed_hold_lives_to_its_new_deadline(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 1000, clock)
    await _tentative(ledger, clock, "r1")
    if not getattr(ledger, "confirms", False):
        # Leases flush holds in batches: the enforcer never makes them tentative.
        assert type(ledger).__name__ == "LeasedLedger"
        return
    assert await ledger.confirm("r1", clock.now() + 600, tok(100))
    clock.advance(11)
    assert await ledger.expire(clock.now()) == 0  # the short deadline no longer applies
    assert (await ledger.balance(org)).reserved == 500
    clock.advance(600)
    assert await ledger.expire(clock.now()) == 1
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (100, 0)  # the confirmed expiry charge


async def test_confirm_after_settle_or_release_is_a_noop(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org = lim("org|a", 1000, clock)
    if not getattr(ledger, "confirms", False):
        return
    await _tentative(ledger, clock, "r1")
    assert (await ledger.settle("r1", tok(90, 10))).settled
    assert not await ledger.confirm("r1", clock.now() + 600, tok(100))
    await _tentative(ledger, clock, "r2")
    clock.advance(11)
    await ledger.expire(clock.now())
    assert not await ledger.confirm("r2", clock.now() + 600, tok(100))
    assert not await ledger.confirm("never", clock.now() + 600, tok(100))
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (100, 0)


async def test_settle_after_release_at_zero_corrects_exactly(env: tuple[Ledger, FakeClock]) -> None:
    # The confirmation came too late (or the store missed it): the settle still counts.
    ledger, clock = env
    org = lim("org|a", 1000, clock)
    await _tentative(ledger, clock, "r1")
    clock.advance(11)
    await ledger.expire(clock.now())
    out = await ledger.settle("r1", tok(120, 30))
    assert out.settled and out.late
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (150, 0)
