"""A replica's lease state, and lease.lua's wire format: one sync with one org.

:mod:`authz.ledger.lease` decides what to ask (a :class:`SyncPlan`); this module turns
it into KEYS/ARGV, runs the script and writes Redis' answer back into the replica's
lease states. The argument layout is documented at the top of lease.lua.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from authz.ledger.base import Limit
from authz.ledger.redis.ledger import RedisLedger, limit_args, weights_args
from authz.usage.types import TokenUsage

__all__ = ["CheckAnswer", "LeaseState", "LocalReservation", "OrgState", "SyncPlan", "run_sync"]

_ZERO = TokenUsage(0, 0, 0)


@dataclass(slots=True)
class LeaseState:
    """One counter as this replica sees it."""

    limit: Limit
    granted: int = 0  # our lease in Redis, as of the last sync
    taken: int = 0  # of it, held by local reservations not flushed yet
    epoch: str = ""
    free: int = 0  # what Redis had left for anyone at the last sync
    draining: bool = False
    valid_until: float = 0.0  # clock time: renewed by every sync
    last_used: float = 0.0  # monotonic: last local admission
    request_units: int = 0  # size of the last request: the smallest extra worth having
    slice: int = 0  # size of the lease after its last top-up
    withheld: int = 0  # offered back in a sync in flight: not for local admissions

    @property
    def avail(self) -> int:
        return self.granted - self.taken - self.withheld


@dataclass(slots=True)
class LocalReservation:
    rid: str
    limits: tuple[Limit, ...]
    units: tuple[int, ...]
    deadline: float
    expiry: TokenUsage
    model: str
    actual: TokenUsage | None = None  # settled here, not flushed yet
    settled_at: float = 0.0  # clock time of that settlement (its rollup bucket)
    in_flight: bool = False  # in a sync right now
    attempts: int = 0  # syncs that asked for it (bounded)


@dataclass(slots=True)
class OrgState:
    tag: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    leases: dict[str, LeaseState] = field(default_factory=dict)
    entries: dict[str, LocalReservation] = field(default_factory=dict)
    waiting: list[tuple[LocalReservation, asyncio.Future[Any]]] = field(default_factory=list)
    leader: asyncio.Task[None] | None = None



@dataclass(slots=True)
class _Ask:
    lease: LeaseState
    give: int = 0
    spare: int = 0
    extra_min: int = 0
    idle: int = 0  # unused at planning time, before anything is withheld


@dataclass(slots=True)
class SyncPlan:
    asks: list[_Ask] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # limit key -> position in asks
    entries: list[LocalReservation] = field(default_factory=list)  # to flush
    checks: list[LocalReservation] = field(default_factory=list)  # to grant, in order

    def counter(
        self, lease: LeaseState, *, give: int = 0, spare: int = 0, extra_min: int = 0
    ) -> None:
        """Add a counter to the sync. ``give`` and ``spare`` are withheld from local
        admissions until the answer: Redis may take them back."""
        i = self.index.get(lease.limit.key)
        if i is None:
            self.index[lease.limit.key] = len(self.asks)
            self.asks.append(_Ask(lease, give, spare, extra_min, max(0, lease.avail)))
            lease.withheld = max(give, spare)
        else:
            self.asks[i].extra_min = max(self.asks[i].extra_min, extra_min)

    @property
    def empty(self) -> bool:
        return not self.entries and not self.checks and not any(
            a.lease.granted or a.give or a.extra_min for a in self.asks
        )


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    granted: bool
    index: int = 0  # refused: the first limit of the check without room (0-based) ...
    free: int = 0  # ... what Redis has left there for anyone
    own: int = 0  # ... this replica's unused lease there
    others: int = 0  # ... and what other replicas hold there without using it


def _pack(
    central: RedisLedger, tag: str, plan: SyncPlan, now: float, replica: str
) -> tuple[list[str], list[Any]]:
    keys = [central.keys.deadlines(tag), central.keys.leases(tag)]
    opts = central.opts.lease
    args: list[Any] = [
        central.keys.base(tag), now, replica, uuid.uuid4().hex[:8], opts.ttl_s,
        central.remember_ms, opts.fraction, opts.max_units, opts.ttl_s, *central.rollup_ms,
        len(plan.asks),
    ]  # fmt: skip
    for ask in plan.asks:
        lim = ask.lease.limit
        keys.append(central.keys.counter(tag, lim.key))
        args += [lim.key, lim.amount, central.counter_ttl_ms(lim, now), *limit_args(lim)]
        args += [ask.lease.epoch, ask.give, ask.spare, ask.extra_min, ask.idle]
    args.append(len(plan.entries))
    for e in plan.entries:
        keys += [central.keys.record(tag, e.rid), central.keys.pending(tag, e.rid)]
        x, a = e.expiry, e.actual or _ZERO
        args += [e.rid, e.deadline, e.model, x.input_tokens, x.cached_input_tokens,
                 x.output_tokens, int(e.actual is not None), a.input_tokens,
                 a.cached_input_tokens, a.output_tokens, e.settled_at or now,
                 len(e.limits)]  # fmt: skip
        for lim, units in zip(e.limits, e.units, strict=True):
            args += [plan.index[lim.key] + 1, units, lim.node, *weights_args(lim)]
    args.append(len(plan.checks))
    for check in plan.checks:
        args.append(len(check.limits))
        for lim, units in zip(check.limits, check.units, strict=True):
            args += [plan.index[lim.key] + 1, units]
    return keys, args


async def run_sync(
    central: RedisLedger, org: OrgState, plan: SyncPlan, now: float, replica: str
) -> list[CheckAnswer]:
    """Run one sync (the caller holds ``org.lock``), apply it to ``org``, answer the checks."""
    for e in plan.entries:  # their counters must be in the sync
        for lim in e.limits:
            if lim.key not in plan.index:
                plan.counter(org.leases[lim.key])
        e.in_flight = True
    keys, args = _pack(central, org.tag, plan, now, replica)
    try:
        answers, states = await central.sync(org.tag, keys, args)
    finally:
        for e in plan.entries:
            e.in_flight = False
        for ask in plan.asks:
            ask.lease.withheld = 0
    await central.index_rids([(e.rid, org.tag, e.deadline) for e in plan.entries], now)
    flushed: dict[str, int] = {}
    for e in plan.entries:
        org.entries.pop(e.rid, None)
        for lim, units in zip(e.limits, e.units, strict=True):
            flushed[lim.key] = flushed.get(lim.key, 0) + units
    checked = {lim.key for c in plan.checks for lim in c.limits}
    for ask, (granted, epoch, left, draining, _lost) in zip(plan.asks, states, strict=True):
        lease = ask.lease
        grew = int(granted) > lease.granted - flushed.get(lease.limit.key, 0) - ask.give
        lease.taken = max(0, lease.taken - flushed.get(lease.limit.key, 0))
        lease.granted = int(granted)
        lease.epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        lease.free, lease.draining = int(left), bool(draining)
        lease.valid_until = now + central.opts.lease.ttl_s / 2
        if grew:
            lease.slice = lease.granted
        if lease.granted == 0 and lease.taken == 0 and lease.limit.key not in checked:
            org.leases.pop(lease.limit.key, None)
    return [CheckAnswer(bool(ok), int(i) - 1, int(free), int(own), int(others))
            for ok, i, free, own, others in answers]  # fmt: skip
