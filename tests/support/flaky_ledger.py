"""A ledger that can be made unreachable or unresponsive: fault injection for the breaker.

inner = FlakyLedger(MemoryLedger(clock))
inner.fault = "down"    # every call raises LedgerUnavailable (Redis stopped)
inner.fault = "hang"    # every call waits forever (Redis under CLIENT PAUSE)
inner.fault = "late"    # the call is done, then the answer never comes (a timeout
                        # after the store already took the write)
inner.fault = "deaf"    # hangs and ignores cancellation until inner.unblock.set()
                        # (a client whose asyncio.wait_for swallowed the cancel)
inner.fault = None      # healthy again
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Literal, TypeVar

from authz.errors import LedgerUnavailable
from authz.ledger.base import Balance, Ledger, Limit, Refusal, Reservation, SettleOutcome
from authz.usage.types import TokenUsage

__all__ = ["FlakyLedger"]

T = TypeVar("T")
Fault = Literal["down", "hang", "late", "deaf"] | None


class FlakyLedger:
    def __init__(self, real: Ledger) -> None:
        self.real = real
        self.fault: Fault = None
        self.calls = 0  # calls that reached this ledger (answered or not)
        self.unblock = asyncio.Event()

    async def _through(self, call: Awaitable[T]) -> T:
        self.calls += 1
        fault = self.fault
        if fault == "down":
            call.close()  # type: ignore[attr-defined]
            raise LedgerUnavailable("connection refused (injected)")
        if fault == "hang":
            call.close()  # type: ignore[attr-defined]
            await asyncio.Event().wait()
        if fault == "deaf":
            while not self.unblock.is_set():
                try:
                    await self.unblock.wait()
                except asyncio.CancelledError:
                    continue  # swallowed
        result = await call
        if fault == "late":
            await asyncio.Event().wait()
        return result

    async def reserve(
        self,
        reservation_id: str,
        limits: tuple[Limit, ...],
        tokens: TokenUsage,
        *,
        deadline: float,
        expiry_charge: TokenUsage,
        model: str = "",
    ) -> Reservation | Refusal:
        return await self._through(
            self.real.reserve(
                reservation_id,
                limits,
                tokens,
                deadline=deadline,
                expiry_charge=expiry_charge,
                model=model,
            )
        )

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        return await self._through(self.real.settle(reservation_id, actual))

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        return await self._through(self.real.charge(charge_id, limits, actual))

    async def expire(self, now: float) -> int:
        return await self._through(self.real.expire(now))

    async def balance(self, limit: Limit) -> Balance:
        return await self._through(self.real.balance(limit))

    async def close(self) -> None:
        await self.real.close()
