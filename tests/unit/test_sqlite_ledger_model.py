"""Property: the sqlite ledger, closed and reopened at any point, answers exactly as a
memory ledger that never stopped. This catches a change of the memory ledger that the
write-behind does not see (a counter or reservation changed but not recorded in
``MemoryLedger.changes``), whoever makes it."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.clock import FakeClock
from authz.ledger import Ledger, Limit, MemoryLedger, Refusal, open_ledger
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

WINDOW = 100.0
OUT = Weights(output=2.0)


def limits(clock: FakeClock, which: int) -> tuple[Limit, ...]:
    """A flat budget, a burst budget whose windows roll (carrying debt), a concurrency cap."""
    w = int(clock.now() // WINDOW)
    end = (w + 1) * WINDOW
    every = (
        Limit("org|a", "org", "org:a", 5000, end + 10 * WINDOW, OUT),
        Limit(
            f"burst|{w}", "burst", "org:a/user:u", 300, end, Weights(),
            carry_from=f"burst|{w - 1}", nominal=200,
        ),
        Limit(
            "conc|u", "conc", "org:a/user:u", 3, end + 10 * WINDOW, Weights(0, 0, 0),
            per_request=1, release_on_settle=True,
        ),
    )
    return tuple(lim for i, lim in enumerate(every) if which & (1 << i)) or every[:1]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(1, 7), st.integers(0, 120), st.integers(0, 60)),
        st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 150), st.integers(0, 90)),
        st.tuples(st.just("charge"), st.integers(0, 5), st.integers(1, 7), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 30.0, 61.0, 100.0, 250.0])),
        st.tuples(st.just("restart")),
    ),
    max_size=40,
)


@dataclass
class Pair:
    clock: FakeClock
    folder: str
    mem: MemoryLedger
    disk: Ledger
    ids: list[str] = field(default_factory=list)

    def reopen(self) -> None:
        self.disk = open_ledger("sqlite:///l.db", self.clock, state_dir=self.folder)


async def _same_state(p: Pair) -> None:
    for lim in limits(p.clock, 7):
        assert await p.mem.balance(lim) == await p.disk.balance(lim), lim.key


async def _run(steps: list[tuple[object, ...]], folder: str) -> None:
    clock = FakeClock(1_000_000.0)
    p = Pair(clock, folder, MemoryLedger(clock), open_ledger("sqlite:///l.db", clock, state_dir=folder))
    used: set[Limit] = set()
    try:
        for step in steps:
            kind = step[0]
            lims: tuple[Limit, ...] = ()
            if kind == "reserve":
                _, which, i, o = step
                rid = f"r{len(p.ids)}"
                lims = limits(clock, int(which))
                args = dict(deadline=clock.now() + 60, expiry_charge=TokenUsage(int(i), 0, 0))
                a = await p.mem.reserve(rid, lims, TokenUsage(int(i), 0, int(o)), **args)
                b = await p.disk.reserve(rid, lims, TokenUsage(int(i), 0, int(o)), **args)
                assert a == b
                if not isinstance(a, Refusal):
                    p.ids.append(rid)
            elif kind == "settle" and p.ids:
                _, n, i, o = step
                rid = p.ids[int(n) % len(p.ids)]
                usage = TokenUsage(int(i), 0, int(o))
                assert await p.mem.settle(rid, usage) == await p.disk.settle(rid, usage)
            elif kind == "charge":
                _, n, which, i = step
                lims = limits(clock, int(which))
                usage = TokenUsage(int(i), 0, 0)
                cid = f"c{n}"
                assert await p.mem.charge(cid, lims, usage) == await p.disk.charge(cid, lims, usage)
            elif kind == "advance":
                clock.advance(float(step[1]))
                assert await p.mem.expire(clock.now()) == await p.disk.expire(clock.now())
            elif kind == "restart":
                await p.disk.close()
                p.reopen()
            used.update(lims if kind in ("reserve", "charge") else ())
            await _same_state(p)
        # Finally: restart, then let everything still open expire, on both.
        await p.disk.close()
        p.reopen()
        assert p.mem.open_reservations == p.disk.open_reservations  # type: ignore[attr-defined]
        clock.advance(1000)
        assert await p.mem.expire(clock.now()) == await p.disk.expire(clock.now())
        for lim in used:
            assert await p.mem.balance(lim) == await p.disk.balance(lim), lim.key
    finally:
        await p.disk.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_reopened_sqlite_ledger_matches_a_memory_ledger_that_never_stopped(
    steps: list[tuple[object, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(_run(steps, folder))
