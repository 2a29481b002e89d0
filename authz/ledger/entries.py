"""What the journal holds: usage that could not reach the ledger, one JSON object a line.

    {"op": "settle", "id": "<reservation id>", "usage": {...}, "at": 1767225600.0}
    {"op": "charge", "id": "local:<id>", "limits": [{...Limit...}], "usage": {...}, "at": ...}

``settle`` is the real usage of a reservation the ledger holds (a reserve that failed is
journaled as a settle of 0, releasing a hold the store may have taken before the
timeout). ``charge`` is the usage of a request admitted locally while the breaker was
open: no reservation exists, so the limits travel with it. Both replay idempotently:
``settle`` by reservation id, ``charge`` by charge id. Limits are written field by field,
so a field added to :class:`Limit` is journaled without a change here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from authz.ledger.base import Limit
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

__all__ = ["ChargeEntry", "Entry", "SettleEntry", "decode", "encode"]


@dataclass(frozen=True, slots=True)
class SettleEntry:
    reservation_id: str
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class ChargeEntry:
    charge_id: str
    limits: tuple[Limit, ...]
    usage: TokenUsage


Entry = SettleEntry | ChargeEntry
_LIMIT_FIELDS = tuple(f.name for f in fields(Limit))


def _usage(u: TokenUsage) -> dict[str, int]:
    return {
        "input": u.input_tokens,
        "cached_input": u.cached_input_tokens,
        "output": u.output_tokens,
    }


def _limit(lim: Limit) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _LIMIT_FIELDS:
        value = getattr(lim, name)
        if isinstance(value, Weights):
            value = [value.input, value.cached_input, value.output]
        out[name] = value
    return out


def encode(entry: Entry, at: float) -> bytes:
    """One line, newline included."""
    if isinstance(entry, SettleEntry):
        obj: dict[str, Any] = {"op": "settle", "id": entry.reservation_id}
    else:
        obj = {"op": "charge", "id": entry.charge_id, "limits": [_limit(x) for x in entry.limits]}
    obj["usage"] = _usage(entry.usage)
    obj["at"] = round(at, 3)
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Entry:
    """Parse one line; ``ValueError`` if it is not an entry this version understands."""
    try:
        obj = json.loads(line)
        u = obj["usage"]
        usage = TokenUsage(int(u["input"]), int(u["cached_input"]), int(u["output"]))
        if obj["op"] == "settle":
            return SettleEntry(str(obj["id"]), usage)
        if obj["op"] == "charge":
            limits = []
            for raw in obj["limits"]:
                w = raw.pop("weights")
                limits.append(Limit(weights=Weights(*w), **raw))
            return ChargeEntry(str(obj["id"]), tuple(limits), usage)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a journal entry: {exc}") from exc
    raise ValueError(f"unknown journal op {obj.get('op')!r}")
