"""The usage journal: fsync'd appends, bounds, compaction, crash leftovers, replay."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.ledger import Limit, MemoryLedger
from authz.ledger.breaker import BreakerLedger
from authz.ledger.entries import ChargeEntry, SettleEntry, decode, encode
from authz.ledger.journal import Journal, JournalFull
from authz.policy.ledger_settings import BreakerSettings
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

LIMIT = Limit("user|u|0", "user-day", "org:a/user:u", 1000, 1_767_312_000.0, Weights(1, 0.5, 4))
U = TokenUsage(10, 2, 3)


def charge(i: int) -> ChargeEntry:
    return ChargeEntry(f"local:c{i}", (LIMIT,), U)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_entries_round_trip_every_limit_field() -> None:
    rpm = Limit("r|k", "rpm", "org:a", 5, 1.5, Weights(0, 0, 0), per_request=1, carry_from="p")
    for entry in (SettleEntry("abc@acme", U), ChargeEntry("local:x", (LIMIT, rpm), U)):
        line = encode(entry, 1.0)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode(line) == entry
    with pytest.raises(ValueError, match="unknown journal op"):
        decode(b'{"op": "drop", "id": "x", "usage": {"input": 1, "cached_input": 0, "output": 0}}')


async def test_append_returns_only_after_fsync(tmp_path: Path, fsyncs: list[int]) -> None:
    journal = Journal.open(tmp_path / "j.jsonl", 1 << 20)
    before = len(fsyncs)
    await journal.append(charge(1))
    assert len(fsyncs) == before + 1
    assert decode((tmp_path / "j.jsonl").read_bytes()) == charge(1)
    assert journal.entries == 1
    await journal.close()


async def test_concurrent_appends_share_fsyncs(tmp_path: Path, fsyncs: list[int]) -> None:
    journal = Journal.open(tmp_path / "j.jsonl", 1 << 20)
    before = len(fsyncs)
    await asyncio.gather(*(journal.append(charge(i)) for i in range(200)))
    lines = (tmp_path / "j.jsonl").read_bytes().splitlines()
    assert sorted(decode(x).charge_id for x in lines) == sorted(f"local:c{i}" for i in range(200))  # type: ignore[union-attr]
    assert len(fsyncs) - before <= 3  # group commit: one write + fsync per batch
    await journal.close()


async def test_full_journal_refuses_rather_than_dropping(tmp_path: Path) -> None:
    line = len(encode(charge(0), 0.0))
    journal = Journal.open(tmp_path / "j.jsonl", 65536)
    n = 0
    with pytest.raises(JournalFull):
        while True:
            await journal.append(charge(n))
            n += 1
    assert 65536 - 2 * line < journal.size <= 65536  # filled, never past the bound
    assert journal.refused == 1 and journal.entries == n
    assert journal.full and not journal.promise(10)
    await journal.close()


async def test_local_admissions_stop_at_90_percent_and_their_promise_is_kept(
    tmp_path: Path,
) -> None:
    line = len(encode(charge(0), 0.0))
    journal = Journal.open(tmp_path / "j.jsonl", 65536)
    promised = 0
    while journal.promise(line):
        promised += 1
    assert promised == int(65536 * 0.9) // line  # promises are exact, lines vary a little
    for i in range(promised - 1):
        await journal.append(charge(i), promised=line)
    # Settlements of real reservations may still use the last 10%...
    await journal.append(SettleEntry("r@acme", U))
    # ...and the last promised charge is written even if the estimate was short.
    await journal.append(charge(9999), promised=line)
    assert journal.entries == promised + 1
    await journal.close()


async def test_confirm_truncates_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.open(path, 1 << 24)
    for i in range(10):
        await journal.append(charge(i))
    entries, lines, offset = await journal.read(4)
    assert [e.charge_id for e in entries] == [f"local:c{i}" for i in range(4)]  # type: ignore[union-attr]
    await journal.confirm(offset, lines)
    assert journal.entries == 6 and path.stat().st_size > 0  # head moved, file kept
    entries, lines, offset = await journal.read(100)
    assert lines == 6
    await journal.append(charge(10))  # appended while replaying: must survive
    await journal.confirm(offset, lines)
    await journal.close()
    assert [decode(x) for x in path.read_bytes().splitlines()] == [charge(10)]


async def test_torn_tail_is_dropped_at_open(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(encode(charge(1), 0.0) + encode(charge(2), 0.0)[:20])
    journal = Journal.open(path, 1 << 20)
    assert journal.entries == 1
    await journal.append(charge(3))
    await journal.close()
    assert [decode(x) for x in path.read_bytes().splitlines()] == [charge(1), charge(3)]


async def test_unreadable_lines_are_skipped_and_dropped(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"not json\n" + encode(charge(1), 0.0))
    journal = Journal.open(path, 1 << 20)
    entries, lines, offset = await journal.read(10)
    assert entries == [charge(1)] and lines == 2
    await journal.confirm(offset, lines)
    assert journal.entries == 0 and path.stat().st_size == 0
    await journal.close()


async def test_a_live_process_keeps_its_file_and_a_dead_ones_is_adopted(tmp_path: Path) -> None:
    base = tmp_path / "j.jsonl"
    first = Journal.open(base, 1 << 20)
    await first.append(charge(1))
    second = Journal.open(base, 1 << 20)  # another worker: the base file is locked
    assert second.path == tmp_path / "j.1.jsonl" and second.entries == 0
    await second.append(charge(2))
    third = Journal.open(base, 1 << 20)  # both files locked: nothing adopted
    assert third.path == tmp_path / "j.2.jsonl" and third.entries == 0
    await third.close()
    await second.close()  # that worker exits with an entry left
    await first.close()
    fourth = Journal.open(base, 1 << 20)  # a new process: takes j.jsonl, adopts j.1
    assert fourth.path == base and fourth.entries == 2
    assert (tmp_path / "j.1.jsonl").stat().st_size == 0
    entries, _, _ = await fourth.read(10)
    assert entries == [charge(1), charge(2)]
    await fourth.close()


# -- replay ---------------------------------------------------------------------------------


async def _breaker(path: Path, inner: MemoryLedger, clock: FakeClock) -> BreakerLedger:
    return BreakerLedger(inner, BreakerSettings(), clock, Journal.open(path, 1 << 24))


async def test_replaying_twice_counts_once(tmp_path: Path) -> None:
    clock = FakeClock()
    inner = MemoryLedger(clock)
    path = tmp_path / "j.jsonl"
    lines = b"".join(encode(charge(i), 0.0) for i in range(50))
    path.write_bytes(lines)
    b = await _breaker(path, inner, clock)
    await b.drain()
    assert b.snapshot().journal_entries == 0
    path.write_bytes(lines)  # as if the process died before the file was compacted
    await b.close()
    b = await _breaker(path, inner, clock)
    await b.drain()
    assert (await inner.balance(LIMIT)).used == 50 * LIMIT.units(U)
    assert b.snapshot().replayed_entries == 50
    await b.close()


async def test_startup_replays_a_journal_left_by_a_previous_process(tmp_path: Path) -> None:
    clock = FakeClock()
    inner = MemoryLedger(clock)
    path = tmp_path / "state" / "journal.jsonl"
    await inner.reserve(
        "r1@acme", (LIMIT,), TokenUsage(100, 0, 100), deadline=clock.now() + 60,
        expiry_charge=TokenUsage(100, 0, 0),
    )  # fmt: skip
    old = Journal.open(path, 1 << 20)
    for i in range(1000):
        await old.append(charge(i))
    await old.append(SettleEntry("r1@acme", TokenUsage(20, 0, 5)))
    await old.close()  # the process stopped while the store was away
    b = await _breaker(path, inner, clock)
    assert b.snapshot().journal_entries == 1001
    await b.start()
    await b.drain()
    bal = await inner.balance(LIMIT)
    assert (bal.used, bal.reserved) == (1000 * LIMIT.units(U) + 40, 0)
    assert b.snapshot().journal_entries == 0 and path.stat().st_size == 0
    await b.close()
