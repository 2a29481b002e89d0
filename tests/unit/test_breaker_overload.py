"""A saturated event loop is not a failing store: it must not open the breaker."""

from __future__ import annotations

import asyncio
import time

import pytest

from authz.clock import FakeClock
from authz.ledger.circuit import BreakerState, Circuit, NoAnswer
from authz.policy.ledger_settings import BreakerSettings

pytestmark = pytest.mark.unit


async def quick() -> int:
    await asyncio.sleep(0.002)  # the store answers in 2 ms
    return 1


async def test_timeouts_caused_by_a_blocked_loop_are_not_failures() -> None:
    circuit = Circuit(BreakerSettings(failures=2, call_timeout_s=0.02), FakeClock())

    async def hog() -> None:  # other Checks hogging the loop: 30 ms at a time
        for _ in range(30):
            time.sleep(0.03)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    hogger = asyncio.create_task(hog())
    await asyncio.sleep(0.05)  # let the lag monitor see the stalls
    for _ in range(8):
        assert await circuit.call(quick, 0.02) == 1
    await hogger
    assert circuit.state is BreakerState.CLOSED and circuit.failures == 0


async def test_a_slow_store_on_an_idle_loop_still_opens_it() -> None:
    circuit = Circuit(BreakerSettings(failures=2, call_timeout_s=0.02), FakeClock())

    async def slow() -> int:
        # Far past the bound even when stretched 4x: a 0.2 s store could finish while a
        # loaded machine held this process longer than that, and be "answered in time".
        await asyncio.sleep(30)
        return 1

    for _ in range(2):
        with pytest.raises(NoAnswer):
            await circuit.call(slow, 0.02)
    assert circuit.state is BreakerState.OPEN
