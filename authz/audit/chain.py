"""The hash chain: how an entry is hashed, and how a sequence of entries is verified.

Every entry is one JSON object::

    {"seq": 7, "ts": 1767225600.123, "kind": "policy_reloaded", "data": {...},
     "prev": "<hash of entry 6>", "hash": "<sha256 of this entry without 'hash'>"}

``hash`` is the SHA-256 of the *canonical* JSON of the other five fields (keys sorted,
no spaces, UTF-8), so any edit of a stored entry (its data, its time, its place) changes
its hash, and any removed or inserted entry breaks the next entry's ``prev``. The first
entry's ``prev`` is 64 zeros. Both backends store exactly this object, so one verifier
serves both; only the *location* of an entry (a file line, a stream id) differs.

The chain proves that nothing *inside* it was changed. It cannot show that entries were
cut off the end: keep the head hash (printed by ``authz audit verify``) somewhere else
too; the Redis backend also keeps it in a separate key and checks it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GENESIS",
    "Broken",
    "Entry",
    "Verified",
    "Walker",
    "canonical",
    "make_entry",
    "verify",
]

GENESIS = "0" * 64


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(seq: int, ts: float, kind: str, data: Mapping[str, Any], prev: str) -> str:
    body = {"seq": seq, "ts": ts, "kind": kind, "data": data, "prev": prev}
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    ts: float
    kind: str
    data: Mapping[str, Any]
    prev: str
    hash: str

    def to_json(self) -> bytes:
        return canonical(
            {
                "seq": self.seq,
                "ts": self.ts,
                "kind": self.kind,
                "data": self.data,
                "prev": self.prev,
                "hash": self.hash,
            }
        )


def make_entry(seq: int, ts: float, kind: str, data: Mapping[str, Any], prev: str) -> Entry:
    ts = round(ts, 3)
    # Round-trip the data through JSON so what is hashed is exactly what is stored.
    clean = json.loads(canonical(data))
    return Entry(seq, ts, kind, clean, prev, _digest(seq, ts, kind, clean, prev))


@dataclass(frozen=True, slots=True)
class Verified:
    count: int
    head: str  # the last entry's hash (GENESIS for an empty log)


@dataclass(frozen=True, slots=True)
class Broken:
    where: str  # the entry's location: "line 18" or "stream id 1767225600123-0"
    seq: int | None
    problem: str

    def __str__(self) -> str:
        entry = f"entry seq={self.seq}" if self.seq is not None else "an entry"
        return f"{entry} at {self.where}: {self.problem}"


class Walker:
    """Checks entries one at a time, in order; ``feed`` returns the first break."""

    def __init__(self) -> None:
        self.prev, self.count = GENESIS, 0

    def feed(self, where: str, raw: bytes | str) -> Broken | None:
        try:
            obj = json.loads(raw)
            seq, ts, kind = obj["seq"], obj["ts"], obj["kind"]
            data, claimed_prev, claimed = obj["data"], obj["prev"], obj["hash"]
        except (ValueError, KeyError, TypeError) as exc:
            return Broken(where, None, f"not an audit entry ({type(exc).__name__})")
        if not isinstance(data, dict) or set(obj) != _FIELDS:
            return Broken(where, seq if isinstance(seq, int) else None, "not an audit entry")
        if _digest(seq, ts, kind, data, claimed_prev) != claimed:
            return Broken(where, seq, "its content does not match its hash (edited)")
        if claimed_prev != self.prev:
            return Broken(
                where, seq, "its prev is not the hash of the entry before it (removed or inserted)"
            )
        if seq != self.count + 1:
            return Broken(where, seq, f"expected seq={self.count + 1} (entries missing)")
        self.prev, self.count = claimed, seq
        return None


_FIELDS = {"seq", "ts", "kind", "data", "prev", "hash"}


def verify(stored: Iterable[tuple[str, bytes | str]]) -> Verified | Broken:
    """Walk (location, raw JSON) pairs in order; the first broken link, or the count."""
    walker = Walker()
    for where, raw in stored:
        broken = walker.feed(where, raw)
        if broken is not None:
            return broken
    return Verified(walker.count, walker.prev)
