"""A circuit breaker around any ledger, with a local journal for usage the store missed.

Every inner call runs under a timeout: ``call_timeout_s`` for ``reserve`` (the request
path), ``max(call_timeout_s, 1 s)`` for the calls nobody waits on. Only
:class:`LedgerUnavailable` and timeouts are failures; a :class:`Refusal` is an answer.

A call the store did not answer (breaker open, the half-open probe already out, or the
call itself failed) is answered by ``ledger.breaker.mode``:

- ``fail_closed``: :class:`LedgerUnavailable` (the enforcer answers 503);
- ``fail_open``: admitted here, as ``local:<id>``, without the store;
- ``local_allowance``: the same, up to ``local_allowance_units`` per limit key on this
  replica until the breaker closes; past it, a :class:`Refusal` naming the limit.

Usage the store cannot take (settlements; charges of local admissions) is journaled and
replayed, idempotently, when the breaker closes, at start-up and after expiry sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from authz.clock import Clock
from authz.errors import LedgerError, LedgerUnavailable
from authz.ledger.base import Balance, Ledger, Limit, Refusal, Reservation, SettleOutcome
from authz.ledger.circuit import BreakerSnapshot, BreakerState, Circuit, NoAnswer, Transition
from authz.ledger.entries import ChargeEntry, Entry, SettleEntry, encode
from authz.ledger.journal import Journal
from authz.ledger.local import LOCAL_PREFIX, LocalAdmissions
from authz.policy.ledger_settings import BreakerSettings
from authz.usage.types import TokenUsage

__all__ = ["BreakerLedger", "BreakerSnapshot", "BreakerState"]

log = logging.getLogger("authz.breaker")
T = TypeVar("T")
_ZERO = TokenUsage(0, 0, 0)
_HUGE = TokenUsage(10**12, 10**12, 10**12)  # sizes a charge line whatever the real usage
# Replay gently: a few calls in flight leave the store's connections to live checks,
# and a burst of replay calls queueing for them must not time out and reopen the breaker.
_REPLAY_BATCH, _REPLAY_PARALLEL = 128, 8


class BreakerLedger:
    def __init__(
        self, inner: Ledger, settings: BreakerSettings, clock: Clock, journal: Journal
    ) -> None:
        self.inner = inner
        self.journal = journal
        self._settings = settings
        self._clock = clock
        self._circuit = Circuit(settings, clock, self._on_change)
        self._local = LocalAdmissions()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replaying: asyncio.Task[None] | None = None
        self.dropped = self.replays = self.replayed_entries = 0

    def configure(self, settings: BreakerSettings) -> None:
        """A reloaded policy: all applies at once, but the journal's file and size."""
        old = self._settings
        if any(
            getattr(settings, f) != getattr(old, f) for f in ("journal_path", "journal_max_bytes")
        ):
            log.warning("ledger.breaker journal_path/journal_max_bytes apply at the next start")
        self._settings = self._circuit.settings = settings

    def snapshot(self) -> BreakerSnapshot:
        c, j = self._circuit, self.journal
        state = c.state
        return BreakerSnapshot(
            state, self._settings.mode, c.since,
            c.retry_at if state is BreakerState.OPEN else None, c.failures, c.opened,
            c.last_error, c.rejected, len(self._local), self._local.admitted,
            self._local.refused, j.entries, j.size, j.full, self.dropped + j.refused,
            self.replays, self.replayed_entries,
        )  # fmt: skip

    async def start(self) -> None:
        """Replay what a previous process left in the journal (in the background)."""
        self._kick_replay()

    # -- calls to the store -------------------------------------------------------------
    @property
    def _slow_timeout(self) -> float:
        return max(self._settings.call_timeout_s, 1.0)

    async def _ask(self, call: Callable[[], Awaitable[T]], limit_s: float) -> T:
        return await self._circuit.call(call, limit_s)

    def _on_change(self, change: Transition) -> None:
        if change.new is BreakerState.CLOSED:
            self._local.reset()
            self._kick_replay()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the Ledger protocol -------------------------------------------------------------
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
        try:
            return await self._ask(
                lambda: self.inner.reserve(
                    reservation_id,
                    limits,
                    tokens,
                    deadline=deadline,
                    expiry_charge=expiry_charge,
                    model=model,
                ),
                self._settings.call_timeout_s,
            )
        except NoAnswer as exc:
            if exc.asked:
                # The store may have taken the hold before the answer was lost: release it
                # once it is back (a settle of 0 for an unknown id is a no-op). Not awaited:
                # losing it costs at most the expiry charge of a hold that may not exist.
                self._spawn(self._journal_entry(SettleEntry(reservation_id, _ZERO)))
            return self._degraded(reservation_id, limits, tokens, deadline, expiry_charge, exc)

    def _degraded(
        self,
        rid: str,
        limits: tuple[Limit, ...],
        tokens: TokenUsage,
        deadline: float,
        expiry_charge: TokenUsage,
        why: NoAnswer,
    ) -> Reservation | Refusal:
        mode = self._settings.mode
        # The fail-open/closed choice is made here, per call the store did not answer, by
        # the policy (default fail_closed; the reasons are at BreakerSettings.mode).
        if mode == "fail_closed":
            raise LedgerUnavailable(f"quota store unreachable ({why}); breaker mode fail_closed")
        cap = self._settings.local_allowance_units if mode == "local_allowance" else None
        checked = self._local.check(limits, tokens, cap)
        if isinstance(checked, Refusal):
            now = self._clock.now()
            retry = self._circuit.retry_at - now if self._circuit.state is BreakerState.OPEN else 1
            return replace(checked, retry_after_s=max(1.0, retry))
        # Admit only what the journal can record later: denying is recoverable, usage
        # that was admitted but never written down is not.
        room = len(encode(ChargeEntry(LOCAL_PREFIX + rid, limits, _HUGE), 0.0))
        if not self.journal.promise(room):
            raise LedgerUnavailable(
                f"quota store unreachable ({why}) and the local usage journal is full: "
                "refusing rather than admitting usage that could not be recorded"
            )
        return self._local.admit(
            rid, limits, checked, deadline=deadline, expiry_charge=expiry_charge, room=room
        )

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        hold = self._local.settle(reservation_id, actual)
        if hold is not None:
            entry = ChargeEntry(hold.id, hold.limits, actual)
            return SettleOutcome(settled=await self._deliver(entry, promised=hold.room))
        if reservation_id.startswith(LOCAL_PREFIX):
            return SettleOutcome(settled=False)  # settled before, expired, or not ours
        try:
            return await self._ask(
                lambda: self.inner.settle(reservation_id, actual), self._slow_timeout
            )
        except NoAnswer:
            ok = await self._journal_entry(SettleEntry(reservation_id, actual))
            return SettleOutcome(settled=ok)

    @property
    def confirms(self) -> bool:
        return bool(getattr(self.inner, "confirms", False))

    async def confirm(self, reservation_id: str, deadline: float, charge: TokenUsage) -> bool:
        """authz.confirm through the circuit. Unanswered, the store's hold expires at its
        short first deadline (charged 0) and the settle that follows, journaled if need
        be, corrects it as a late settle: exact, though that one hold was not kept."""
        local = self._local.confirm(reservation_id, deadline, charge)
        if local is not None:
            return local
        try:
            return bool(await self._ask(
                lambda: self.inner.confirm(reservation_id, deadline, charge),
                self._slow_timeout,
            ))  # fmt: skip
        except NoAnswer:
            return False

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        return await self._deliver(ChargeEntry(charge_id, limits, actual))

    async def expire(self, now: float) -> int:
        n = 0
        for hold in self._local.expired(now):
            entry = ChargeEntry(hold.id, hold.limits, hold.expiry_charge)
            await self._deliver(entry, promised=hold.room)
            n += 1
        with contextlib.suppress(NoAnswer):
            n += await self._ask(lambda: self.inner.expire(now), self._slow_timeout)
        self._kick_replay()  # entries journaled while the breaker stayed closed
        return n

    async def ping(self) -> bool:
        """A PING through the circuit, for readiness (authz/readiness.py): once cooled
        down it is the half-open probe, so a replica without traffic still closes its
        breaker. A ledger without ``ping`` counts as reachable."""
        ping = getattr(self.inner, "ping", None)
        if ping is None:
            return True
        if self._circuit.state is BreakerState.OPEN:
            return False
        try:
            await self._ask(ping, self._slow_timeout)
        except NoAnswer:
            return False
        return True

    async def balance(self, limit: Limit) -> Balance:
        try:
            return await self._ask(lambda: self.inner.balance(limit), self._slow_timeout)
        except NoAnswer as exc:
            raise LedgerUnavailable(f"quota store unreachable ({exc})") from None

    async def close(self) -> None:
        """Stop: holds never settled are charged their expiry amount, then a last replay."""
        for hold in self._local.drain():
            entry = ChargeEntry(hold.id, hold.limits, hold.expiry_charge)
            await self._deliver(entry, promised=hold.room)
        try:
            async with asyncio.timeout(5.0):
                await self.drain()
        except TimeoutError:
            log.warning("stopping with %d journal entries left", self.journal.entries)
        await self.inner.close()
        await self.journal.close()

    # -- journal ----------------------------------------------------------------------
    async def _deliver(self, entry: ChargeEntry, *, promised: int = 0) -> bool:
        try:
            done = await self._ask(
                lambda: self.inner.charge(entry.charge_id, entry.limits, entry.usage),
                self._slow_timeout,
            )
        except NoAnswer:
            return await self._journal_entry(entry, promised=promised)
        self.journal.release(promised)
        return done

    async def _journal_entry(self, entry: Entry, *, promised: int = 0) -> bool:
        try:
            await self.journal.append(entry, promised=promised)
        except LedgerError as exc:
            self.dropped += 1
            # Explicit, never silent: a settlement lost here leaves the store to charge the
            # reservation's expiry amount when it comes back.
            log.error("usage not journaled, %s: %s", exc, entry)
            return False
        return True

    async def drain(self) -> None:
        """Replay the journal now if the breaker is closed, and wait for it."""
        if self._tasks:  # journal writes in flight go first
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._kick_replay()
        if self._replaying is not None:
            await self._replaying

    def _kick_replay(self) -> None:
        idle = self._replaying is None or self._replaying.done()
        if idle and self.journal.entries and self._circuit.state is BreakerState.CLOSED:
            self._replaying = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        started, total, gate = time.perf_counter(), 0, asyncio.Semaphore(_REPLAY_PARALLEL)
        while self._circuit.state is BreakerState.CLOSED:
            entries, lines, offset = await self.journal.read(_REPLAY_BATCH)
            if not lines:
                break
            try:
                done = await asyncio.gather(*(self._apply(e, gate) for e in entries))
            except Exception:  # a bug (or a backend without charge): keep the entries
                log.exception("journal replay failed; %d entries kept", self.journal.entries)
                break
            if not all(done):
                break  # the store failed again: the breaker says when to try again
            await self.journal.confirm(offset, lines)  # only now may the file forget them
            total += lines
        if total:
            self.replays += 1
            self.replayed_entries += total
            log.info(
                "journal replayed: %d entries in %.3f s, %d left",
                total, time.perf_counter() - started, self.journal.entries,
                extra={"replayed": total, "journal_entries": self.journal.entries},
            )  # fmt: skip

    async def _apply(self, entry: Entry, gate: asyncio.Semaphore) -> bool:
        call: Callable[[], Awaitable[object]]
        if isinstance(entry, SettleEntry):
            call = lambda: self.inner.settle(entry.reservation_id, entry.usage)  # noqa: E731
        else:
            call = lambda: self.inner.charge(entry.charge_id, entry.limits, entry.usage)  # noqa: E731
        async with gate:
            try:
                await self._ask(call, self._slow_timeout)
            except NoAnswer:
                return False
        return True
