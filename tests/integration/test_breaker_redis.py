"""The breaker against a real redis-server: stopped mid-traffic, then paused.

Eight concurrent callers run Check -> (the model answers) -> settle through the real
Enforcer and the Redis ledger (``lease=off``: every call is a Redis round trip, so the
breaker sees the outage at once). Redis is stopped and started again (its AOF on, as a
production Redis would keep its counters), then paused with ``CLIENT PAUSE`` so calls
time out. The breaker must open and close both times, the decisions while it is open
must follow the mode, and at the end Redis must hold exactly the usage the callers
reported: nothing lost (journaled settlements and local charges are replayed), nothing
doubled (replay is idempotent, reserves that timed out are released), nothing held.

A missing redis-server fails these tests (tests/support/redis_proc.py), never skips.
Run with ``-s`` to see the observed timings; ``BREAKER_OUTAGE_REQUESTS`` sets how many
decisions are made while Redis is stopped (the journal's size to replay).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from authz.decision import Decision
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import Limit, open_ledger
from authz.ledger.breaker import BreakerLedger, BreakerState
from authz.ledger.journal import Journal
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage
from tests.support.redis_proc import LOOPBACK, RedisServer

pytestmark = pytest.mark.integration

USERS = ("alice", "bob", "carol")
OUTAGE = int(os.environ.get("BREAKER_OUTAGE_REQUESTS", "300"))
# A stopped Redis (SIGTERM) writes its AOF out before exiting: counters survive restarts.
AOF = ("--appendonly", "yes", "--appendfsync", "everysec")
CHAT = b'{"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}'


def _policy(mode: str, journal: Path) -> str:
    keys = "\n".join(
        f"    - {{name: {u}, sha256: {hashlib.sha256(f'k-{u}'.encode()).hexdigest()}, "
        f"claims: {{org_id: acme, sub: {u}}}}}"
        for u in USERS
    )
    return f"""
version: 1
identity:
  api_keys:
{keys}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
weights: {{input: 1, output: 2}}
budgets:
  - {{name: org-day, match: {{org: acme}}, tokens: 100000000, period: day}}
  - {{name: user-day, match: {{user: "*"}}, tokens: 10000000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 100}}]
# A day: the test skips every cool-down on its clock (SkipClock), and on a busy machine
# the 50 ms call timeout reopens the breaker again and again, each time another 5 s
# skipped. With the default 600 s, holds still waiting for their settle then expired
# (settle said False: "unsettled 1" and "3" in stressed runs), a clock artefact.
reservations: {{ttl_s: 86400}}
ledger:
  breaker:
    failures: 5
    window_s: 10
    open_s: 5
    call_timeout_s: 0.05
    mode: {mode}
    local_allowance_units: 4000
    journal_path: {journal}
"""


class SkipClock:
    """Wall time that a test can move forward: the cool-down passes without sleeping."""

    def __init__(self) -> None:
        self.skew = 0.0

    def now(self) -> float:
        return time.time() + self.skew

    def advance(self, seconds: float) -> None:
        self.skew += seconds


@dataclass
class Book:
    """What the callers saw and what the fake upstream reported, per counter."""

    expected: Counter[str] = field(default_factory=Counter)
    limits: dict[str, Limit] = field(default_factory=dict)
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)  # (breaker state, outcome)
    check_ms: dict[str, list[float]] = field(default_factory=dict)


def _outcome(d: Decision) -> str:
    if d.allowed:
        return "local" if (d.reservation_id or "").startswith("local:") else "allowed"
    return f"{d.status} {d.detail or d.reason}"


class Traffic:
    def __init__(self, enf: Enforcer, breaker: BreakerLedger) -> None:
        self.enf, self.breaker, self.book = enf, breaker, Book()
        self.rng = random.Random(4)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._settling: set[asyncio.Task[bool]] = set()
        self.unsettled = 0  # settle() said False: the usage was neither taken nor journaled

    async def one(self, user: str) -> None:
        state = self.breaker.snapshot().state.name.lower()
        req = CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer k-{user}"}, CHAT)  # fmt: skip
        start = time.perf_counter()
        d = await self.enf.check(req)
        self.book.check_ms.setdefault(state, []).append((time.perf_counter() - start) * 1000)
        self.book.seen[(state, _outcome(d))] += 1
        if not d.allowed:
            await asyncio.sleep(0.002)
            return
        assert d.reservation_id is not None and d.subject is not None
        limits = self.enf.limits_for(self.enf.policy, d.subject, d.model)
        await asyncio.sleep(0.003)  # the model answers; this is what it reports
        usage = TokenUsage(self.rng.randint(1, 300), 0, self.rng.randint(1, 100))
        for lim in limits:
            self.book.expected[lim.key] += lim.settled_units(usage)
            self.book.limits[lim.key] = lim
        # Settled in a task of its own, as ext_proc does: the client is not held up.
        task = asyncio.create_task(self.enf.settle(d.reservation_id, usage))
        self._settling.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[bool]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is None and not task.result():
            self.unsettled += 1

    async def _worker(self, i: int) -> None:
        while not self._stop.is_set():
            await self.one(USERS[i % len(USERS)])

    def start(self, workers: int = 8) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, *self._settling)

    def count(self, state: str) -> int:
        return sum(n for (s, _), n in self.book.seen.items() if s == state)


async def _until(what: str, predicate: Callable[[], bool], limit_s: float = 60.0) -> float:
    """Poll (real time: a real Redis is what changes) until true; return seconds taken."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > limit_s:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(0.005)
    return round(time.perf_counter() - start, 3)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2) as s:
            s.settimeout(0.2)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class ReplayLog(logging.Handler):
    """Collects the breaker's "journal replayed: N entries in S s" lines."""

    def __init__(self) -> None:
        super().__init__()
        self.replays: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("journal replayed"):
            total, seconds, _ = record.args  # type: ignore[misc]
            self.replays.append((int(total), round(float(seconds), 3)))


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open", "local_allowance"])
async def test_stopped_and_paused_redis(mode: str, tmp_path: Path) -> None:
    figures: dict[str, object] = {"mode": mode}
    replays, breaker_log = ReplayLog(), logging.getLogger("authz.breaker")
    breaker_log.addHandler(replays)
    breaker_log.setLevel(logging.INFO)
    with RedisServer(tmp_path / "redis", extra=AOF) as redis:
        policy = tmp_path / "policy.yaml"
        policy.write_text(_policy(mode, tmp_path / "state" / "journal.jsonl"))
        store, clock = PolicyStore(policy), SkipClock()
        settings = store.current.breaker
        inner = open_ledger(redis.url + "?lease=off", clock)
        journal = Journal.open(settings.journal_path, settings.journal_max_bytes)
        breaker = BreakerLedger(inner, settings, clock, journal)
        traffic = Traffic(Enforcer(store, breaker, clock), breaker)
        try:
            await _outages(redis, breaker, traffic, clock, figures)
        finally:
            breaker_log.removeHandler(replays)
            breaker_log.setLevel(logging.NOTSET)
            await traffic.stop()
            snap = breaker.snapshot()
            await breaker.close()
            book = traffic.book
            figures.update(
                opened=snap.opened, clock_skipped_s=clock.skew, replays=replays.replays,
                decisions={f"{s}: {o}": n for (s, o), n in sorted(book.seen.items())},
                check_ms_p50={s: round(sorted(v)[len(v) // 2], 2) for s, v in book.check_ms.items()},
                check_ms_max={s: round(max(v), 2) for s, v in book.check_ms.items()},
            )  # fmt: skip
            print("\nbreaker figures:", json.dumps(figures, indent=1))

        # The breaker opened and closed (at least) twice; while open, decisions followed the
        # mode.
        assert snap.opened >= 2 and snap.journal_entries == 0 and snap.journal_dropped == 0
        assert traffic.unsettled == 0
        open_outcomes = {o for (s, o), _ in book.seen.items() if s == "open"}
        if mode == "fail_closed":
            assert open_outcomes == {"503 ledger_unavailable"}
        elif mode == "fail_open":
            assert open_outcomes == {"local"}
        else:
            assert open_outcomes == {"local", "429 local_allowance"}

        # Redis holds exactly what was reported: none lost, none doubled, nothing held.
        reader = open_ledger(redis.url + "?lease=off", clock)
        try:
            for key, lim in book.limits.items():
                bal = await reader.balance(lim)
                assert (key, bal.used, bal.reserved) == (key, book.expected[key], 0)
        finally:
            await reader.close()


OPEN_S = 5.0  # the policy's ledger.breaker.open_s


async def _recovered(breaker: BreakerLedger, clock: SkipClock) -> float:
    """Seconds until the breaker is closed again, its cool-downs skipped on the clock.

    More than one cool-down may pass: a store that is back but slow (reconnects, scripts
    to load, a backlog to catch up) can fail the probe or trip the breaker again.
    Half-open waits for a call to probe with. When the traffic is stopped (draining), no
    call comes: the service's readiness loop (authz/readiness.py) pings then, and so does
    this. (A busy machine reopens the breaker on the test's 50 ms call timeout after the
    traffic stopped; waiting for a call there waited for nothing.)
    """
    start = time.perf_counter()
    while (state := breaker.snapshot().state) is not BreakerState.CLOSED:
        if state is BreakerState.OPEN:
            clock.advance(OPEN_S)
        elif state is BreakerState.HALF_OPEN:
            await breaker.ping()
        if time.perf_counter() - start > 60:
            raise AssertionError("the breaker did not close within 60 s")
        await asyncio.sleep(0.005)
    return round(time.perf_counter() - start, 3)


async def _healthy(traffic: Traffic, breaker: BreakerLedger, clock: SkipClock, n: int) -> None:
    """Until ``n`` decisions were made with the breaker closed. On a busy machine a call
    to the healthy store can miss the test's 50 ms timeout and trip the breaker: its
    cool-down is skipped as in :func:`_recovered`, not waited out in real time."""
    start = time.perf_counter()
    while traffic.count("closed") < n:
        if breaker.snapshot().state is BreakerState.OPEN:
            clock.advance(OPEN_S)
        if time.perf_counter() - start > 60:
            raise AssertionError(f"timed out after 60 s waiting for healthy traffic: {n}")
        await asyncio.sleep(0.005)


async def _drained(breaker: BreakerLedger, clock: SkipClock) -> None:
    """Replay until the journal is empty (the breaker may open again meanwhile)."""
    start = time.perf_counter()
    while breaker.snapshot().journal_entries:
        await _recovered(breaker, clock)
        await breaker.drain()
        if time.perf_counter() - start > 60:
            raise AssertionError(f"journal not drained: {breaker.snapshot()}")


async def _outages(
    redis: RedisServer,
    breaker: BreakerLedger,
    traffic: Traffic,
    clock: SkipClock,
    figures: dict[str, object],
) -> None:
    def is_(state: BreakerState) -> Callable[[], bool]:
        return lambda: breaker.snapshot().state is state

    # Healthy traffic first, then Redis is stopped under it and started again.
    traffic.start()
    await _healthy(traffic, breaker, clock, 100)
    await asyncio.to_thread(redis.stop)
    figures["stop_to_open_s"] = await _until("the breaker to open", is_(BreakerState.OPEN))
    await _until("decisions while open", lambda: traffic.count("open") >= OUTAGE)
    await asyncio.to_thread(redis.start)
    figures["journal_entries_at_restart"] = breaker.snapshot().journal_entries
    figures["restart_to_closed_s"] = await _recovered(breaker, clock)
    await traffic.stop()
    await _drained(breaker, clock)

    # Then Redis is paused: calls hang until they time out. (CLIENT PAUSE ALL also holds
    # CLIENT UNPAUSE on Redis 6.2, so the pause is given a length and waited out.)
    traffic.start()
    await _healthy(traffic, breaker, clock, 300)
    paused = time.perf_counter()
    await asyncio.to_thread(redis.cli, "CLIENT", "PAUSE", "1500", "ALL")
    figures["pause_to_open_s"] = await _until("the breaker to open", is_(BreakerState.OPEN))
    await _until("the pause to end", lambda: _answers_ping(redis.port))
    figures["pause_lasted_s"] = round(time.perf_counter() - paused, 3)
    figures["journal_entries_at_unpause"] = breaker.snapshot().journal_entries
    figures["unpause_to_closed_s"] = await _recovered(breaker, clock)
    await traffic.stop()
    await _drained(breaker, clock)
