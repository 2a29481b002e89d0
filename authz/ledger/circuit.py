"""The breaker's state machine, and the calls it lets through (each under a hard timeout).

    closed ──(``failures`` failed calls in a row, all within ``window_s``)──► open
    open ──(``open_s`` elapsed; checked lazily on the next call)──► half-open
    half-open ──(one probe call lets through; it succeeds)──► closed
    half-open ──(the probe fails)──► open (the cool-down starts again)

A success while closed forgets earlier failures: the breaker is there to notice a store
that cannot be reached, not to judge one slow call now and then. Under load, "5
failures in 10 s" counted without that reset would open the breaker on a healthy Redis.
Only the probe's outcome moves half-open; a call that started before the breaker opened
and ends after cannot close (or re-open) it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

from authz.clock import Clock
from authz.errors import LedgerUnavailable
from authz.policy.ledger_settings import BreakerSettings

__all__ = ["BreakerSnapshot", "BreakerState", "Circuit", "NoAnswer", "Ticket", "Transition"]

log = logging.getLogger("authz.breaker")
T = TypeVar("T")


class LoopLag:
    """How late this event loop runs its callbacks right now, sampled every 10 ms.

    A call that misses its timeout because the process is saturated (every Check waits
    its turn on one loop) says nothing about the store; counting it would open the
    breaker under load and turn an overload into an outage. One timer callback per
    10 ms, nothing per call.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self._interval = interval_s
        self.lag = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new loop (tests)
            self._loop = loop
            self._due = loop.time() + self._interval
            loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop or loop.is_closed():
            return
        late = loop.time() - self._due
        self.lag = max(late, self.lag * 0.8)  # a spike decays over ~10 samples
        self._due = loop.time() + self._interval
        loop.call_at(self._due, self._tick, loop)


async def _bounded(call: Callable[[], Awaitable[T]], limit_s: float, lag: LoopLag) -> T:
    """``call()`` within ``limit_s``, a hard bound: it runs as a task of its own, so a
    backend slow to honour a cancel (Python 3.11's wait_for can even swallow one) cannot
    hold the request past the timeout. The abandoned task is cancelled, not awaited.

    While the loop itself runs late (the process is saturated), the bound stretches by
    that lateness, up to 4x ``limit_s``: the store is not why the answer is late."""
    lag.ensure_running()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(call())
    start = loop.time()
    deadline = start + limit_s
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(task)
            except TimeoutError:
                if task.done() and not task.cancelled() and task.exception() is None:
                    return task.result()  # answered in time; the loop was late to say so
                stretched = min(start + limit_s + lag.lag, start + 4 * limit_s)
                if stretched <= deadline:
                    raise
                deadline = stretched
    except TimeoutError:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise
    except BaseException:  # the caller was cancelled (Envoy gave up): so is the call
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


class NoAnswer(Exception):
    """The store was not asked (the breaker is open) or did not answer (failed, timed out)."""

    def __init__(self, reason: str, *, asked: bool) -> None:
        super().__init__(reason)
        self.asked = asked  # False: the breaker kept the call from the store


class BreakerState(IntEnum):
    """The values are the ``authz_ledger_breaker_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What metrics and ``/readyz`` show."""

    state: BreakerState
    mode: str
    since: float  # when the state last changed (epoch seconds)
    retry_at: float | None  # open: when the next probe may go
    failures: int  # failures in the current run (closed)
    opened: int  # times opened since start
    last_error: str
    rejected: int  # calls answered without the store
    local_open: int  # local admissions not yet settled
    local_admitted: int
    local_refused: int
    journal_entries: int
    journal_bytes: int
    journal_full: bool
    journal_dropped: int  # usage that could not be journaled (logged as errors)
    replays: int
    replayed_entries: int

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["state"] = self.state.name.lower()
        return out


@dataclass(frozen=True, slots=True)
class Ticket:
    """Leave to call the inner ledger; ``probe`` marks the one call of half-open."""

    probe: bool
    epoch: int  # the state change it was issued in: stale outcomes are ignored


@dataclass(frozen=True, slots=True)
class Transition:
    old: BreakerState
    new: BreakerState
    at: float
    reason: str


class Circuit:
    def __init__(
        self,
        settings: BreakerSettings,
        clock: Clock,
        on_change: Callable[[Transition], None] = lambda _: None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self.since = clock.now()  # when the state last changed
        self._failures: list[float] = []  # times of the failures in a row
        self._probing = False
        self.opened = 0  # times opened since start
        self.rejected = 0  # calls kept from the store
        self.last_error = ""
        self._lag = LoopLag()

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock.now() >= self.retry_at:
            self._move(BreakerState.HALF_OPEN, "cool-down over: next call probes")
        return self._state

    @property
    def retry_at(self) -> float:
        """When an open breaker lets its probe through."""
        return self.since + self.settings.open_s

    @property
    def failures(self) -> int:
        return len(self._failures)

    async def call(self, fn: Callable[[], Awaitable[T]], limit_s: float) -> T:
        """``fn()`` if the state lets it through, within ``limit_s``; else :class:`NoAnswer`.

        Only :class:`LedgerUnavailable` and timeouts are failures; anything else (a
        cancel, a bug) says nothing about the store and is raised as it is.
        """
        ticket = self.acquire()
        if ticket is None:
            self.rejected += 1
            raise NoAnswer(f"breaker {self.state.name.lower()}", asked=False)
        try:
            result = await _bounded(fn, limit_s, self._lag)
        except (LedgerUnavailable, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {limit_s * 1000:g} ms"
            self.failure(ticket, reason)
            raise NoAnswer(reason, asked=True) from exc
        except BaseException:
            self.abandon(ticket)
            raise
        self.success(ticket)
        return result

    def acquire(self) -> Ticket | None:
        """A ticket to call the inner ledger, or None: answer without it."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Ticket(False, self._epoch)
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return Ticket(True, self._epoch)
        return None

    def success(self, ticket: Ticket) -> None:
        if ticket.epoch != self._epoch:
            return
        if ticket.probe:
            self._probing = False
            self._move(BreakerState.CLOSED, "probe succeeded")
        else:
            self._failures.clear()

    def failure(self, ticket: Ticket, error: str) -> None:
        if ticket.epoch != self._epoch:
            return
        self.last_error = error
        if ticket.probe:
            self._probing = False
            self._open(f"probe failed: {error}")
            return
        now = self._clock.now()
        self._failures.append(now)
        # Only a run of failures inside the window counts: drop the run's stale head.
        self._failures = [t for t in self._failures if t > now - self.settings.window_s]
        if len(self._failures) >= self.settings.failures:
            self._open(f"{len(self._failures)} failures in a row: {error}")

    def abandon(self, ticket: Ticket) -> None:
        """The call ended without an answer about the store (cancelled, or a bug)."""
        if ticket.probe and ticket.epoch == self._epoch:
            self._probing = False

    def _open(self, reason: str) -> None:
        self.opened += 1
        self._move(BreakerState.OPEN, reason)

    def _move(self, new: BreakerState, reason: str) -> None:
        old, self._state = self._state, new
        self._epoch += 1
        self.since = self._clock.now()
        self._failures.clear()
        self._probing = False
        change = Transition(old, new, self.since, reason)
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "ledger breaker %s -> %s: %s",
            old.name.lower(),
            new.name.lower(),
            reason,
            extra={"breaker": new.name.lower(), "previous": old.name.lower()},
        )
        self._on_change(change)
