"""The in-memory ledger: the embedded default, one process, exact.

Atomicity comes from asyncio itself: no method awaits between reading and writing the
counters, so a reservation is checked and taken on every limit in one step.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from authz.clock import Clock
from authz.ledger.base import Balance, Limit, Refusal, Reservation, SettleOutcome, opening
from authz.usage.bounds import ledger_usage
from authz.usage.types import TokenUsage

__all__ = ["STALE_DEADLINES", "Changes", "MemoryLedger"]

# Entries of settled reservations the deadline heap may keep beyond twice the open ones.
STALE_DEADLINES = 64


class Changes:
    """What changed since a write-behind store (authz.ledger.sqlite) last took it: counter
    keys (created, updated or dropped; a burst debt lives under its counter's key) and
    reservation or charge ids (opened, settled, expired)."""

    __slots__ = ("ids", "keys")

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.ids: set[str] = set()


@dataclass(slots=True)
class _Counter:
    amount: int
    window_end: float
    used: int = 0
    reserved: int = 0
    nominal: int = 0  # > 0 for burst budgets: overdraft past it is carried as debt
    forward: str | None = None  # inherited by this counter: changes here count there too


@dataclass(slots=True)
class _Open:
    keys: tuple[str, ...]
    limits: tuple[Limit, ...]
    units: tuple[int, ...]
    deadline: float
    expiry_charge: TokenUsage


def _compact(memory: dict[str, Any]) -> dict[str, Any]:
    """The same dict, rebuilt if deletions left its hash table over four times too big
    (a dict never shrinks its table by deletion: 200k ids gone would keep ~8 MB)."""
    size = sys.getsizeof(memory)
    return dict(memory) if size > 8192 + 200 * len(memory) else memory


def _forget(memory: dict[str, Any], now: float, cap: int) -> None:
    """Drop entries from the front of an insertion-ordered dict whose last field is a
    forget-at time: all that are due, and the oldest beyond ``cap``."""
    while memory:
        key = next(iter(memory))
        entry = memory[key]
        due = entry if isinstance(entry, float) else entry[-1]
        if due > now and len(memory) <= cap:
            return
        del memory[key]


class MemoryLedger:
    """Counters and reservations in dicts; every structure is bounded so memory stays
    flat however many checks pass, and follows activity, not history (issue 9, #7):
    counters go when their window ends and nothing holds them, expired reservations and
    charge ids after an age and beyond a cap, and this happens on the periodic
    ``expire`` (the server's sweep) too, so an idle ledger shrinks back.

    How long an expired reservation is kept (``remember_expired_s``, 600 s): a late
    settle comes from an ext_proc stream that outlived the reservation's TTL. The shipped
    Envoy route has no overall deadline (long streamed answers are normal) but cuts an
    upstream silent for 300 s (``idle_timeout``); a stream still running 10 minutes past
    its TTL (600 s by default, so 20 minutes after its check) is charged the expiry
    amount and its real usage is refused as unknown. Serve longer answers? Raise
    ``reservations.ttl_s`` above the longest, not this. Settled ids are not kept at all:
    idempotency comes from the open (and expired) reservations, which a settle removes,
    so a second settle finds none; nothing read them (the write-behind store does not
    write them), and 60 s of them were ~20k strings at 300 checks/s. Charge ids
    (journal replays) stay an hour: a replay can follow a long outage.

    Why no object made per request outlives it (issue 9, #7): CPython hands a 1 MiB
    arena back only when every object in it is gone, so a few hundred objects left from
    the last seconds of a burst of new callers keep the arenas that burst filled. The
    deadline heap kept up to 1,024 entries of settled reservations (a tuple, its id and
    its deadline each) until the next rebuild, which an idle ledger never reached: 21
    arenas before 30k one-off callers, 25 after them in process. It is now rebuilt once
    it holds :data:`STALE_DEADLINES` more entries than twice the open reservations."""

    confirms = True  # authz.confirm: a Check's hold waits for the gateway to use it

    def __init__(
        self,
        clock: Clock,
        *,
        remember_expired_s: float = 600.0,
        remember_charges_s: float = 3600.0,
        max_remembered: int = 200_000,
    ) -> None:
        self._clock = clock
        self._counters: dict[str, _Counter] = {}
        self._ends: list[tuple[float, str]] = []  # (window_end, key): when a counter may go
        self._open: dict[str, _Open] = {}
        self._deadlines: list[tuple[float, str]] = []
        # Expired reservations, so a late settle can correct the expiry charge:
        # id -> (limits, charged, forget_at). Rare, but capped all the same.
        self._expired: dict[str, tuple[tuple[Limit, ...], tuple[int, ...], float]] = {}
        self._charges: dict[str, float] = {}  # charge id -> forget_at, oldest first
        self._expired_s = remember_expired_s
        self._charges_s = remember_charges_s
        self._cap = max_remembered
        self._next_prune = 0.0
        # Overdrafts of pruned burst windows: key -> (debt, forget_at).
        self._debts: dict[str, tuple[int, float]] = {}
        self.changes: Changes | None = None  # recorded only when a store asks for it

    def _changed(self, keys: Iterable[str], rid: str) -> None:
        if self.changes is not None:
            self.changes.keys.update(keys)
            self.changes.ids.add(rid)

    def _counter(self, limit: Limit) -> _Counter:
        if self.changes is not None:
            self.changes.keys.add(limit.key)
            if limit.carry_from is not None:
                self.changes.keys.add(limit.carry_from)
        c = self._counters.get(limit.key)
        if c is None:
            c = self._counters[limit.key] = _Counter(
                limit.amount, limit.window_end, nominal=limit.nominal
            )
            heapq.heappush(self._ends, (limit.window_end, limit.key))
            if limit.carry_from is not None:
                # Burst payback and rollover: what the last window spent beyond its
                # nominal amount is this window's opening debt; what it left, a credit.
                prev = self._counters.get(limit.carry_from)
                if prev is not None:
                    carry = prev.used - limit.nominal
                else:
                    carry = self._debts.pop(limit.carry_from, (0, 0.0))[0]
                c.used = opening(carry, limit.rollover)
            if limit.inherit is not None:
                # A policy edit renamed the budget or moved its window (issue 16): go on
                # from what its old counter spent and holds, holds counted as spent
                # until they settle; from now on every change there counts here too.
                old = self._counters.get(limit.inherit)
                if old is not None:
                    c.used += old.used + old.reserved
                    old.forward = limit.key
        elif c.amount != limit.amount:  # a reloaded policy may change the amount
            # Only then: each plan computes its amount anew, and a long-lived counter
            # holding the last request's int would keep that int's arena (see above).
            c.amount = limit.amount
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
        tokens, expiry_charge = ledger_usage(tokens), ledger_usage(expiry_charge)  # as Redis
        counters = [self._counter(lim) for lim in limits]
        units = tuple(lim.units(tokens) for lim in limits)
        for lim, c, u in zip(limits, counters, units, strict=True):
            left = c.amount - c.used - c.reserved
            if u > left and lim.enforce:
                return Refusal(lim, u, max(0, left))
        remaining = []
        for c, u in zip(counters, units, strict=True):
            c.reserved += u
            if c.forward is not None:
                self._mirror(c, u)
            remaining.append(c.amount - c.used - c.reserved)
        keys = tuple(lim.key for lim in limits)
        self._open[reservation_id] = _Open(keys, limits, units, deadline, expiry_charge)
        heapq.heappush(self._deadlines, (deadline, reservation_id))
        self._changed((), reservation_id)
        return Reservation(reservation_id, limits, units, tuple(remaining), deadline)

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        actual = ledger_usage(actual)  # each count within [0, LEDGER_MAX_TOKENS], as Redis
        res = self._open.pop(reservation_id, None)
        if res is not None:
            charged = tuple(lim.settled_units(actual) for lim in res.limits)
            for key, held, spent in zip(res.keys, res.units, charged, strict=True):
                c = self._counters.get(key)
                if c is not None:
                    c.reserved -= held
                    c.used += spent
                    if c.forward is not None:
                        self._mirror(c, spent - held)
            self._changed(res.keys, reservation_id)
            return SettleOutcome(settled=True)
        expired = self._expired.pop(reservation_id, None)
        if expired is not None:
            # Expired earlier and charged the expiry amount: correct it to the real usage.
            limits, charged, _ = expired
            real = tuple(lim.settled_units(actual) for lim in limits)
            for lim, was, now in zip(limits, charged, real, strict=True):
                c = self._counters.get(lim.key)
                if c is not None:
                    c.used += now - was
                    if c.forward is not None:
                        self._mirror(c, now - was)
            self._changed((lim.key for lim in limits), reservation_id)
            return SettleOutcome(settled=True, late=True)
        return SettleOutcome(settled=False)

    async def confirm(self, reservation_id: str, deadline: float, charge: TokenUsage) -> bool:
        """The gateway used the Check's answer (authz.confirm): the hold lives until
        ``deadline`` (never shortened) and is charged ``charge`` if it expires."""
        res = self._open.get(reservation_id)
        if res is None:
            return False  # settled already, or expired (released) before the confirmation
        res.expiry_charge = ledger_usage(charge)
        if deadline > res.deadline:
            res.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, reservation_id))  # the old one is stale
        self._changed((), reservation_id)
        return True

    async def expire(self, now: float) -> int:
        self._maintain()  # the sweep calls this every second: an idle ledger shrinks too
        count = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            res = self._open.get(rid)
            if res is None or res.deadline > now:
                continue  # settled in time, or confirmed: a later entry is in the heap
            del self._open[rid]
            charged = tuple(lim.settled_units(res.expiry_charge) for lim in res.limits)
            for key, held, spent in zip(res.keys, res.units, charged, strict=True):
                c = self._counters.get(key)
                if c is not None:
                    c.reserved -= held
                    c.used += spent
                    if c.forward is not None:
                        self._mirror(c, spent - held)
            self._expired[rid] = (res.limits, charged, now + self._expired_s)
            self._changed(res.keys, rid)
            count += 1
        return count

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        actual = ledger_usage(actual)
        if charge_id in self._charges:
            return False
        for lim in limits:
            c = self._counter(lim)
            c.used += lim.settled_units(actual)
            if c.forward is not None:
                self._mirror(c, lim.settled_units(actual))
        self._charges[charge_id] = self._clock.now() + self._charges_s
        self._changed((), charge_id)
        return True

    def _mirror(self, c: _Counter, delta: int) -> None:
        """A change of ``used + reserved`` on a counter another one inherited (a renamed
        budget, a window in another timezone) counts on the inheritor too: a request
        held before a reload settles where it was held, and the new counter follows."""
        for _ in range(8):  # a few edits in one window at most; never a cycle forever
            nxt = self._counters.get(c.forward) if c.forward is not None else None
            if nxt is None or delta == 0:
                return
            nxt.used += delta
            if self.changes is not None:
                self.changes.keys.add(c.forward)  # type: ignore[arg-type]
            c = nxt

    async def balance(self, limit: Limit) -> Balance:
        c = self._counters.get(limit.key)
        if c is None:
            return Balance(limit.amount, 0, 0)
        return Balance(c.amount, c.used, c.reserved)

    async def close(self) -> None:
        return None

    def _maintain(self) -> None:
        # Amortised: at most once a second, on the reserve path, and never a scan of
        # everything: heaps say which counters' windows ended, dicts are oldest-first.
        now = self._clock.now()
        if now < self._next_prune:
            return
        self._next_prune = now + 1.0
        while self._ends and self._ends[0][0] <= now:
            _, key = heapq.heappop(self._ends)
            c = self._counters.get(key)
            if c is None:
                continue
            if c.reserved > 0 or c.window_end > now:  # still held, or re-created later
                heapq.heappush(self._ends, (max(c.window_end, now + 60.0), key))
                continue
            del self._counters[key]
            if self.changes is not None:
                self.changes.keys.add(key)
            if c.nominal and c.used != c.nominal:
                # A month can pass before the next window's first request: keep the debt
                # (or the unused part, negative, for a rollover).
                self._debts[key] = (c.used - c.nominal, now + 40 * 86400)
        for key in [k for k, (_, forget) in self._debts.items() if forget <= now]:
            del self._debts[key]
        _forget(self._expired, now, self._cap)
        _forget(self._charges, now, self._cap)
        self._counters, self._open = _compact(self._counters), _compact(self._open)
        self._expired = _compact(self._expired)
        self._charges, self._debts = _compact(self._charges), _compact(self._debts)
        if len(self._deadlines) > 2 * len(self._open) + STALE_DEADLINES:
            # Settled reservations leave their deadline in the heap: rebuild it from the
            # open ones before it outgrows them, and soon after traffic stops (at most
            # once a second: O(open) each time, amortised O(1) per settle).
            self._deadlines = [(r.deadline, rid) for rid, r in self._open.items()]
            heapq.heapify(self._deadlines)

    # Introspection for tests and the admin API.
    @property
    def open_reservations(self) -> int:
        return len(self._open)
