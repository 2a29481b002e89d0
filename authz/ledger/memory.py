"""The in-memory ledger: the embedded default, one process, exact.

Atomicity comes from asyncio itself: no method awaits between reading and writing the
counters, so a reservation is checked and taken on every limit in one step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from authz.clock import Clock
from authz.ledger.base import Balance, Limit, Refusal, Reservation, SettleOutcome
from authz.usage.types import TokenUsage

__all__ = ["MemoryLedger"]


@dataclass(slots=True)
class _Counter:
    amount: int
    window_end: float
    used: int = 0
    reserved: int = 0
    nominal: int = 0  # > 0 for burst budgets: overdraft past it is carried as debt


@dataclass(slots=True)
class _Open:
    keys: tuple[str, ...]
    limits: tuple[Limit, ...]
    units: tuple[int, ...]
    deadline: float
    expiry_charge: TokenUsage


class MemoryLedger:
    """Counters and reservations in dicts, bounded: old windows and settled ids are pruned."""

    def __init__(self, clock: Clock, *, remember_settled_s: float = 3600.0) -> None:
        self._clock = clock
        self._counters: dict[str, _Counter] = {}
        self._open: dict[str, _Open] = {}
        # Settled or expired reservations, kept a while so a repeated settle is a no-op
        # and a late settle can correct an expiry charge: id -> (limits, charged, forget_at).
        self._closed: dict[str, tuple[tuple[Limit, ...], tuple[int, ...], float, bool]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._charges: dict[str, float] = {}  # charge id -> forget_at, like settled ids
        self._remember_s = remember_settled_s
        self._next_prune = 0.0
        # Overdrafts of pruned burst windows: key -> (debt, forget_at).
        self._debts: dict[str, tuple[int, float]] = {}

    def _counter(self, limit: Limit) -> _Counter:
        c = self._counters.get(limit.key)
        if c is None:
            c = self._counters[limit.key] = _Counter(
                limit.amount, limit.window_end, nominal=limit.nominal
            )
            if limit.carry_from is not None:
                # Burst payback: what the last window spent beyond its nominal amount is
                # this window's opening debt.
                prev = self._counters.get(limit.carry_from)
                if prev is not None:
                    c.used = max(0, prev.used - limit.nominal)
                else:
                    c.used = self._debts.pop(limit.carry_from, (0, 0.0))[0]
        else:
            c.amount = limit.amount  # a reloaded policy may change the amount
        return c

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
        self._maintain()
        counters = [self._counter(lim) for lim in limits]
        units = tuple(lim.units(tokens) for lim in limits)
        for lim, c, u in zip(limits, counters, units, strict=True):
            left = c.amount - c.used - c.reserved
            if u > left:
                return Refusal(lim, u, max(0, left))
        remaining = []
        for c, u in zip(counters, units, strict=True):
            c.reserved += u
            remaining.append(c.amount - c.used - c.reserved)
        keys = tuple(lim.key for lim in limits)
        self._open[reservation_id] = _Open(keys, limits, units, deadline, expiry_charge)
        heapq.heappush(self._deadlines, (deadline, reservation_id))
        return Reservation(reservation_id, limits, units, tuple(remaining), deadline)

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        res = self._open.pop(reservation_id, None)
        if res is not None:
            charged = tuple(lim.settled_units(actual) for lim in res.limits)
            for key, held, spent in zip(res.keys, res.units, charged, strict=True):
                c = self._counters.get(key)
                if c is not None:
                    c.reserved -= held
                    c.used += spent
            self._remember(reservation_id, res.limits, charged, late_fixable=False)
            return SettleOutcome(settled=True)
        closed = self._closed.get(reservation_id)
        if closed is not None and closed[3]:
            # Expired earlier and charged the expiry amount: correct it to the real usage.
            limits, charged, _, _ = closed
            real = tuple(lim.settled_units(actual) for lim in limits)
            for lim, was, now in zip(limits, charged, real, strict=True):
                c = self._counters.get(lim.key)
                if c is not None:
                    c.used += now - was
            self._remember(reservation_id, limits, real, late_fixable=False)
            return SettleOutcome(settled=True, late=True)
        return SettleOutcome(settled=False)

    async def expire(self, now: float) -> int:
        count = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            res = self._open.pop(rid, None)
            if res is None:
                continue  # settled in time
            charged = tuple(lim.settled_units(res.expiry_charge) for lim in res.limits)
            for key, held, spent in zip(res.keys, res.units, charged, strict=True):
                c = self._counters.get(key)
                if c is not None:
                    c.reserved -= held
                    c.used += spent
            self._remember(rid, res.limits, charged, late_fixable=True)
            count += 1
        return count

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        if charge_id in self._charges:
            return False
        for lim in limits:
            self._counter(lim).used += lim.settled_units(actual)
        self._charges[charge_id] = self._clock.now() + self._remember_s
        return True

    async def balance(self, limit: Limit) -> Balance:
        c = self._counters.get(limit.key)
        if c is None:
            return Balance(limit.amount, 0, 0)
        return Balance(c.amount, c.used, c.reserved)

    async def close(self) -> None:
        return None

    def _remember(
        self, rid: str, limits: tuple[Limit, ...], charged: tuple[int, ...], *, late_fixable: bool
    ) -> None:
        self._closed[rid] = (limits, charged, self._clock.now() + self._remember_s, late_fixable)

    def _maintain(self) -> None:
        # Pruning is amortised: at most once a second, on the reserve path.
        now = self._clock.now()
        if now < self._next_prune:
            return
        self._next_prune = now + 1.0
        held = {k for r in self._open.values() for k in r.keys}
        for key in [k for k, c in self._counters.items() if c.window_end <= now and k not in held]:
            c = self._counters.pop(key)
            if c.nominal and c.used > c.nominal:
                # A month can pass before the next window's first request: keep the debt.
                self._debts[key] = (c.used - c.nominal, now + 40 * 86400)
        for key in [k for k, (_, forget) in self._debts.items() if forget <= now]:
            del self._debts[key]
        for rid in [r for r, v in self._closed.items() if v[2] <= now]:
            del self._closed[rid]
        for cid in [c for c, forget in self._charges.items() if forget <= now]:
            del self._charges[cid]

    # Introspection for tests and the admin API.
    @property
    def open_reservations(self) -> int:
        return len(self._open)
