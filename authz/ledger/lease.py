"""Edge leases: most checks decided in this process, a hard budget still never overspent.

A replica asks Redis (lease.lua, atomically per org) for a slice of each hot counter: at
least what the request needs, plus an extra ``fraction`` of what is left (capped at
``max_units``). Redis counts every lease in the counter (``l``), so leases + reservations
+ usage never exceed the amount, whoever asks. Then:

- **reserve**: if every limit's lease has room, the check is decided here (no round
  trip); else it queues, and one sync for all checks queued meanwhile (group commit)
  tops the leases up or names, per check, the first exhausted limit.
- **batches**: every ``flush_s`` a background task syncs each org with news: locally
  admitted reservations become ordinary Redis reservations (records, deadlines), ones
  already settled here are charged at once, and unused lease is given back when the
  counter is idle, its window is over, or it is *draining*; leases nearing their end
  are topped up ahead of need.
- **draining**: when a replica is refused while others hold leases on that counter,
  Redis marks it draining: holders give back their unused slices on their next sync,
  no lease carries an extra slice for a while (leases shrink to single reservations),
  and the refused replica retries for a few flush intervals before it answers 429. So
  the last tokens are spendable by whichever replica asks.
- **settle on another replica**: Envoy may send the ext_proc stream (settle) to a
  replica other than the one that reserved. Unknown ids settle straight to Redis. If the
  owner has not flushed the reservation yet, Redis parks the settlement and the
  owner's next flush applies it; the settling replica waits a few flush intervals for
  that, so its answer (settled or not) is still exact.
- a replica that dies keeps its leases until their TTL; the sweeper (expire.lua) then
  counts them as spent: unknowable local admissions must not become an overspend.

``local_checks`` / ``remote_checks`` count checks decided without / with a Redis round
trip, ``local_share`` is their ratio, and ``on_check`` (if set) hears each decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from authz.clock import Clock
from authz.errors import LedgerUnavailable
from authz.ledger.base import Balance, Limit, Refusal, Reservation, SettleOutcome
from authz.ledger.redis.config import LeaseOptions
from authz.ledger.redis.ledger import RedisLedger
from authz.ledger.redis.sync import (
    CheckAnswer,
    LeaseState,
    LocalReservation,
    OrgState,
    SyncPlan,
    run_sync,
)
from authz.ledger.rollup import Granularity, UsageRow
from authz.usage.bounds import ledger_usage
from authz.usage.types import TokenUsage

__all__ = ["LeasedLedger"]

log = logging.getLogger("authz.ledger.lease")


class LeasedLedger:
    confirms = False  # holds on leases are flushed in batches: they live ttl_s at once

    def __init__(self, central: RedisLedger, clock: Clock, opts: LeaseOptions) -> None:
        self.central = central
        self.opts = opts
        self.replica = uuid.uuid4().hex[:12]
        self._clock = clock
        self._orgs: dict[str, OrgState] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closing = False
        self._failing = False  # the background flush is failing (logged once per outage)
        self.local_checks = 0
        self.remote_checks = 0
        # Called with "local" or "redis" per check, e.g. to feed the Prometheus counter
        # authz_lease_decisions_total{where=...} (authz.telemetry.metrics).
        self.on_check: Callable[[str], None] | None = None

    @property
    def local_share(self) -> float:
        total = self.local_checks + self.remote_checks
        return self.local_checks / total if total else 0.0

    def _org(self, tag: str) -> OrgState:
        org = self._orgs.get(tag)
        if org is None:
            org = self._orgs[tag] = OrgState(tag)
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())
        return org

    # -- reserve ----------------------------------------------------------------------
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
        org = self._org(self.central.keys.tag_for(reservation_id, limits))
        tokens, expiry_charge = ledger_usage(tokens), ledger_usage(expiry_charge)  # as Lua
        units = tuple(lim.units(tokens) for lim in limits)
        local = LocalReservation(reservation_id, limits, units, deadline, expiry_charge, model)
        done = self._take_local(org, local)
        if done is not None:
            self.local_checks += 1
            if self.on_check is not None:
                self.on_check("local")
            return done
        self.remote_checks += 1
        if self.on_check is not None:
            self.on_check("redis")
        # Group commit: checks that need Redis queue up, and one task asks for all of
        # them in one sync; a burst of first checks is then one round trip, not N.
        fut: asyncio.Future[Reservation | Refusal] = asyncio.get_running_loop().create_future()
        org.waiting.append((local, fut))
        if org.leader is None or org.leader.done():
            org.leader = asyncio.get_running_loop().create_task(self._lead(org))
        return await fut

    async def _lead(self, org: OrgState) -> None:
        while org.waiting:
            batch = [(loc, f) for loc, f in org.waiting if not f.done()]
            org.waiting.clear()
            try:
                async with org.lock:
                    await self._serve(org, batch)
            except Exception as exc:  # LedgerUnavailable, or a bug: every waiter learns it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)

    async def _serve(
        self, org: OrgState, batch: list[tuple[LocalReservation, asyncio.Future[Any]]]
    ) -> None:
        pending = [(loc, f) for loc, f in batch if not self._resolve(org, loc, f)]
        if not pending:
            return
        answers = await self._run(org, self._plan(org, [loc for loc, _ in pending]))
        again, wait = [], False
        for (loc, f), answer in zip(pending, answers, strict=True):
            if f.done():
                continue
            loc.attempts += 1
            if loc.attempts > 20:
                f.set_exception(LedgerUnavailable("leases kept being taken; try again"))
            elif answer.granted:
                if not self._resolve(org, loc, f):
                    again.append((loc, f))  # local checks took it meanwhile: ask again
            elif (
                answer.others
                and answer.free + answer.others + answer.own >= loc.units[answer.index]
                and loc.attempts <= 3
            ):
                # Others hold unused leases and the counter now drains: they give them
                # back on their next sync. Ask again then (for at most 3 flush intervals).
                again.append((loc, f))
                wait = True
            else:
                j = answer.index
                f.set_result(Refusal(loc.limits[j], loc.units[j], answer.free + answer.own))
        if wait:
            await asyncio.sleep(self.opts.flush_s)
        org.waiting.extend(again)

    def _resolve(
        self, org: OrgState, local: LocalReservation, fut: asyncio.Future[Any]
    ) -> bool:
        """Decide ``local`` from the leases if they have room now; True when decided."""
        if fut.done():
            return True  # its caller gave up (timed out): nothing to hold for it
        done = self._take_local(org, local)
        if done is not None:
            fut.set_result(done)
        return done is not None

    async def _run(self, org: OrgState, plan: SyncPlan) -> list[CheckAnswer]:
        return await run_sync(self.central, org, plan, self._clock.now(), self.replica)

    def _take_local(self, org: OrgState, local: LocalReservation) -> Reservation | None:
        now = self._clock.now()
        leases = []
        for lim, need in zip(local.limits, local.units, strict=True):
            lease = org.leases.get(lim.key)
            if lease is None:
                lease = org.leases[lim.key] = LeaseState(lim)
            lease.limit, lease.request_units = lim, need
            leases.append(lease)
        for lease, need in zip(leases, local.units, strict=True):
            if lease.avail < need or lease.valid_until <= now:
                return None
        mono = time.monotonic()
        for lease, need in zip(leases, local.units, strict=True):
            lease.taken += need
            lease.last_used = mono
        org.entries[local.rid] = local
        # An audit-only limit (enforce: false) may be past its amount: say so (negative),
        # as the central reserve does, so the answer can warn that it would have refused.
        remaining = tuple(lz.free + lz.avail if not lz.limit.enforce else max(0, lz.free + lz.avail)
                          for lz in leases)  # fmt: skip
        return Reservation(local.rid, local.limits, local.units, remaining, local.deadline)

    def _plan(self, org: OrgState, checks: Sequence[LocalReservation] = ()) -> SyncPlan:
        """One sync's content: ``checks`` to grant; flushes, give-backs, top-ups for all."""
        plan = SyncPlan()
        now, mono = self._clock.now(), time.monotonic()
        idle_s = max(1.0, 20 * self.opts.flush_s)
        for local in checks:
            plan.checks.append(local)
            for lim, need in zip(local.limits, local.units, strict=True):
                lease = org.leases[lim.key]
                plan.counter(lease, extra_min=0 if lease.draining else need)
        for lease in org.leases.values():
            if lease.limit.key in plan.index:
                continue
            over = lease.limit.window_end <= now or self._closing
            idle = mono - lease.last_used > idle_s
            give = lease.avail if (over or idle or lease.draining) else 0
            # Top up ahead of need, so steady traffic rarely waits for a round trip.
            low = lease.avail < max(2 * lease.request_units, lease.slice // 4)
            topup = not (give or over or idle or lease.draining) and low and lease.slice > 0
            # Offer the unused part back when Redis runs low: if the counter is draining,
            # Redis takes it in this sync rather than on the next.
            scarce = lease.draining or lease.free < 2 * lease.slice
            plan.counter(lease, give=give, spare=max(0, lease.avail) if scarce else 0,
                         extra_min=lease.request_units if topup else 0)  # fmt: skip
        for entry in org.entries.values():
            if not entry.in_flight:
                plan.entries.append(entry)
        return plan

    # -- settle, expire, balance ----------------------------------------------------------
    def _owner(self, reservation_id: str) -> OrgState | None:
        """The org holding an unflushed local reservation with this id, if any."""
        if "@" in reservation_id:
            return self._orgs.get(self.central.keys.tag_for_id(reservation_id))
        return next((o for o in self._orgs.values() if reservation_id in o.entries), None)

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        actual = ledger_usage(actual)  # the local tally must agree with what Lua charges
        org = self._owner(reservation_id)
        while org is not None and reservation_id in org.entries:
            entry = org.entries[reservation_id]
            if entry.actual is not None:
                return SettleOutcome(settled=False)
            if not entry.in_flight:
                entry.actual = actual  # charged by the next flush: no round trip
                entry.settled_at = self._clock.now()
                return SettleOutcome(settled=True)
            async with org.lock:  # being flushed right now: then it is an ordinary record
                pass
        token = uuid.uuid4().hex
        code = await self.central.settle_code(reservation_id, actual, token)
        waited = 0.0
        while code == 3 and waited < max(0.2, 4 * self.opts.flush_s):
            # Not in Redis yet: parked for its owner's next flush. Wait to learn the end.
            await asyncio.sleep(self.opts.flush_s)
            waited += self.opts.flush_s
            code = await self.central.settle_code(reservation_id, actual, token)
        return SettleOutcome(settled=code in (1, 2), late=code == 2)

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        return await self.central.charge(charge_id, limits, actual)

    async def confirm(self, reservation_id: str, deadline: float, charge: TokenUsage) -> bool:
        return False  # ``confirms`` is False: the enforcer never makes tentative holds here

    async def expire(self, now: float) -> int:
        await self.flush()
        return await self.central.expire(now)

    async def balance(self, limit: Limit) -> Balance:
        org = self._orgs.get(self.central.keys.tag_for_limit(limit))
        if org is not None:
            await self._sync_org(org)
        raw = await self.central.counter(limit, f"L:{self.replica}")
        if raw[0] is None:
            return Balance(limit.amount, 0, 0)
        amount, used, reserved, leased, mine = (int(x or 0) for x in raw)
        lease = org.leases.get(limit.key) if org is not None else None
        taken = lease.taken if lease is not None else 0
        return Balance(amount, used, reserved + leased - mine + taken)

    async def rollups(
        self, node: str, granularity: Granularity, start: float, end: float
    ) -> list[UsageRow]:
        await self.flush()
        return await self.central.rollups(node, granularity, start, end)

    # -- batches ------------------------------------------------------------------------
    async def flush(self) -> None:
        """Sync every org now (settlements, reservations, give-backs)."""
        await asyncio.gather(*(self._sync_org(org) for org in list(self._orgs.values())))

    async def _sync_org(self, org: OrgState) -> None:
        async with org.lock:
            plan = self._plan(org)
            if plan.empty:
                return
            await self._run(org, plan)
            # An org's state is never dropped, even when quiet: a leader may already
            # hold a batch for it (taken from org.waiting, waiting for org.lock). A
            # dropped state would live on in that leader while the next check made a
            # second one, and two local views of this replica's one lease in Redis
            # admit twice. Orgs are few; their leases are pruned as they empty.

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            # Not cancelled at close: a script cut off mid-call would leak its connection.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.opts.flush_s)
            busy = [o for o in list(self._orgs.values()) if not o.lock.locked()]
            results = await asyncio.gather(
                *(self._sync_org(o) for o in busy), return_exceptions=True
            )
            errors = [exc for exc in results if isinstance(exc, Exception)]
            if errors and not self._failing:
                log.warning("lease flush failing (retried every %ss): %s", self.opts.flush_s,
                            errors[0])  # fmt: skip
            elif self._failing and not errors:
                log.info("lease flush recovered")
            self._failing = bool(errors)

    async def ping(self) -> None:
        await self.central.ping()

    async def close(self) -> None:
        """Flush and give every lease back, then close the connection."""
        self._closing = True
        self._stop.set()
        if self._task is not None:
            await self._task
        try:
            await self.flush()
        except LedgerUnavailable as exc:
            log.error("could not flush leases at shutdown (they expire in %ss): %s",
                      self.opts.ttl_s, exc)  # fmt: skip
        await self.central.close()
