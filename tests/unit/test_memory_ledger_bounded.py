"""The memory ledger keeps nothing per request beyond what is open: no growth per check."""

from __future__ import annotations

import pytest

from authz.clock import FakeClock
from authz.ledger import Limit, MemoryLedger, Reservation
from authz.ledger.memory import STALE_DEADLINES
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit


async def test_settled_ids_deadlines_and_old_windows_stay_bounded() -> None:
    clock = FakeClock()
    ledger = MemoryLedger(clock, max_remembered=1000)
    for i in range(20_000):
        # A new user and a new minute window every 100 checks: counters come and go.
        lim = Limit(
            f"u|user:{i // 100}|{i // 100}",
            "u",
            f"user:{i // 100}",
            10**9,
            clock.now() + 60,
            Weights(),
        )
        out = await ledger.reserve(
            f"r{i}",
            (lim,),
            TokenUsage(5, 0, 5),
            deadline=clock.now() + 600,
            expiry_charge=TokenUsage(5, 0, 0),
        )
        assert isinstance(out, Reservation)
        await ledger.settle(f"r{i}", TokenUsage(5, 0, 5))
        clock.advance(0.05)
    assert ledger.open_reservations == 0
    assert not hasattr(ledger, "_settled")  # settled ids are not kept (never read)
    assert len(ledger._deadlines) <= STALE_DEADLINES + 20  # compacted each second (20/s here)
    assert len(ledger._counters) <= 30  # ended windows are dropped (20 s of 60 s windows)
    assert not (await ledger.settle("r19999", TokenUsage(1, 0, 1))).settled  # still idempotent


async def test_held_counter_outlives_its_window_until_released() -> None:
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    lim = Limit(
        "c|org:a|c",
        "c",
        "org:a",
        1,
        clock.now() + 5,
        Weights(0, 0, 0),
        per_request=1,
        release_on_settle=True,
    )
    await ledger.reserve(
        "r1",
        (lim,),
        TokenUsage(1, 0, 0),
        deadline=clock.now() + 600,
        expiry_charge=TokenUsage(0, 0, 0),
    )
    clock.advance(10)
    await ledger.reserve(
        "probe",
        (),
        TokenUsage(0, 0, 0),
        deadline=clock.now() + 1,
        expiry_charge=TokenUsage(0, 0, 0),
    )  # runs the amortised prune
    assert (await ledger.balance(lim)).reserved == 1  # not dropped while held
