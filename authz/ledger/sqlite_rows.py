"""Between the memory ledger's entries and the SQLite file's rows, both ways.

This is the one module outside :mod:`authz.ledger.memory` that knows its private layout
(counters, open and expired reservations, charge ids, burst debts). The contract
suite runs against ``sqlite`` and the persistence tests reopen files, so a change of
that layout that is not mirrored here fails them.

:func:`take` runs on the event loop and only copies numbers and references; the JSON of
open and expired reservations (their limits) is encoded when the rows are written, on
the flush thread, by :class:`_Body` (a string subclass would encode on the loop).
"""

from __future__ import annotations

import heapq
import json
import operator
from dataclasses import asdict, fields
from typing import Any

from authz.ledger.base import Limit
from authz.ledger.memory import Changes, MemoryLedger, _Counter, _Open
from authz.ledger.sqlite_file import FileRows
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

__all__ = ["OnDisk", "restore", "take"]


_USAGE_FIELDS = tuple(f.name for f in fields(TokenUsage))
_USAGE = operator.attrgetter(*_USAGE_FIELDS)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
# Limit -> its JSON. Thousands of reservations share a few limits (one org, its users'
# windows), and encoding a dataclass is the costliest part of a flush. Written and read
# on flush threads only; cleared, not evicted, when full.
_FRAGMENTS: dict[Limit, str] = {}


def _limit_from(d: dict[str, Any]) -> Limit:
    return Limit(**{**d, "weights": Weights(**d["weights"])})


def _limits_json(limits: tuple[Limit, ...]) -> str:
    out = []
    for lim in limits:
        frag = _FRAGMENTS.get(lim)
        if frag is None:
            if len(_FRAGMENTS) >= 65_536:
                _FRAGMENTS.clear()
            frag = _FRAGMENTS[lim] = _ENCODE(asdict(lim))
        out.append(frag)
    return "[" + ",".join(out) + "]"


def _ints(values: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, map(int, values))) + "]"


def _encode_open(res: _Open) -> str:
    # Usage positional, in field order: cheaper than a dict, and a new field appends.
    usage = _ENCODE(_USAGE(res.expiry_charge))
    return (f'{{"limits":{_limits_json(res.limits)},"units":{_ints(res.units)},'
            f'"expiry_charge":{usage}}}')  # fmt: skip


def _encode_expired(limits: tuple[Limit, ...], charged: tuple[int, ...]) -> str:
    return f'{{"limits":{_limits_json(limits)},"charged":{_ints(charged)}}}'


class _Body:
    """A row value encoded late: sqlite3 adapts it on the writing thread."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __conform__(self, protocol: object) -> str:
        return str(self.fn(*self.args))


class OnDisk:
    """Which open reservations, expired ones and burst debts may have a row in the
    file, so a flush deletes only rows that can exist (most requests open and close
    between two flushes; few expire; almost no counter has a debt). Shrunk only after a
    write succeeded: a row that may still be there is deleted again rather than left
    behind (a stale open row would be charged on expiry after the next restart)."""

    __slots__ = ("debts", "expired", "open")

    def __init__(self, rows: FileRows) -> None:
        self.open: set[str] = {row[0] for row in rows.open}
        self.expired: set[str] = {row[0] for row in rows.expired}
        self.debts: set[str] = {row[0] for row in rows.debts}

    def written(self, rows: FileRows) -> None:
        self.open.difference_update(rows.gone_open)
        self.expired.difference_update(rows.gone_expired)
        self.debts.difference_update(rows.gone_debts)


def take(mem: MemoryLedger, changes: Changes, disk: OnDisk) -> FileRows:
    """The rows for what changed: present entries are written, absent ones deleted."""
    rows = FileRows()
    counters, debts = mem._counters, mem._debts
    for key in changes.keys:
        c = counters.get(key)
        if c is None:
            rows.gone_counters.append(key)
        else:
            rows.counters.append((key, c.amount, c.window_end, c.used, c.reserved, c.nominal))
        debt = debts.get(key)
        if debt is not None:
            rows.debts.append((key, *debt))
            disk.debts.add(key)
        elif key in disk.debts:
            rows.gone_debts.append(key)
    # Settled ids are not written: settle is idempotent because a settled reservation is
    # no longer open (its open row goes in the same transaction as its counters move),
    # and the memory ledger never reads them. One row less per request.
    opened, expired, charges = mem._open, mem._expired, mem._charges
    for rid in changes.ids:
        res = opened.get(rid)
        if res is not None:
            rows.open.append((rid, res.deadline, _Body(_encode_open, res)))  # type: ignore[arg-type]
            disk.open.add(rid)
            continue
        if rid in disk.open:
            rows.gone_open.append(rid)
        late = expired.get(rid)
        if late is not None:
            limits, charged, forget_at = late
            rows.expired.append((rid, forget_at, _Body(_encode_expired, limits, charged)))  # type: ignore[arg-type]
            disk.expired.add(rid)
        elif rid in disk.expired:
            rows.gone_expired.append(rid)  # settled late, or forgotten (a memory's cap)
        if rid in charges:
            rows.charges.append((rid, charges[rid]))
    return rows


def restore(mem: MemoryLedger, rows: FileRows) -> None:
    """Put a loaded file back into a fresh memory ledger (before it takes any call)."""
    for key, amount, window_end, used, reserved, nominal in rows.counters:
        mem._counters[key] = _Counter(amount, window_end, used, reserved, nominal)
        heapq.heappush(mem._ends, (window_end, key))
    for key, debt, forget_at in rows.debts:
        mem._debts[key] = (debt, forget_at)
    for rid, deadline, text in rows.open:
        d = json.loads(text)
        limits = tuple(_limit_from(x) for x in d["limits"])
        keys = tuple(lim.key for lim in limits)
        mem._open[rid] = _Open(keys, limits, tuple(d["units"]), deadline,
                               TokenUsage(**dict(zip(_USAGE_FIELDS, d["expiry_charge"],
                                                     strict=False))))  # fmt: skip
        heapq.heappush(mem._deadlines, (deadline, rid))
    for rid, forget_at, body in rows.expired:  # oldest first, as the memories are kept
        d = json.loads(body)
        limits = tuple(_limit_from(x) for x in d["limits"])
        mem._expired[rid] = (limits, tuple(d["charged"]), forget_at)
    for cid, forget_at in rows.charges:
        mem._charges[cid] = forget_at
