"""Usage rollups for analytics: tokens and cost per node and model, per hour and per day.

Every settlement (and every expiry charge) adds its tokens to the UTC hour and the UTC
day it happened in, once for each distinct node on the reservation's path. ``units`` is
the cost in the budget's own currency: the weighted units charged on that node (its
first budget on the path). A late settle adds the correction, not a second request.
Hourly buckets are kept 8 days after they end, daily ones 400 days (Redis TTLs).

The Redis ledger keeps them in the same atomic script as the settlement (hashes
``<prefix>:{org}:u:<h|d>:<start>:<node>``, see redis/keys.py), so a repeated settle
never counts twice. Read them with ``RedisLedger.rollups(node, granularity, start, end)``.
The model label comes from ``reserve(..., model=...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "GRANULARITY_S",
    "Granularity",
    "UsageRow",
    "bucket_starts",
    "rows_from_fields",
]

Granularity = Literal["hour", "day"]
GRANULARITY_S: dict[str, int] = {"hour": 3600, "day": 86400}
HOUR_RETENTION_S = 8 * 86400
DAY_RETENTION_S = 400 * 86400


@dataclass(frozen=True, slots=True)
class UsageRow:
    start: int  # bucket start, epoch seconds (UTC-aligned)
    node: str
    model: str  # the policy's model label (bounded), "" if the caller gave none
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    units: int = 0  # cost: weighted units charged on this node
    requests: int = 0


def bucket_starts(granularity: Granularity, start: float, end: float) -> list[int]:
    """Starts of the buckets that overlap ``[start, end)``."""
    size = GRANULARITY_S[granularity]
    first = math.floor(start / size) * size
    return list(range(int(first), math.ceil(end), size)) if end > first else []


_FIELD = {"i": "input_tokens", "c": "cached_input_tokens", "o": "output_tokens",
          "u": "units", "n": "requests"}  # fmt: skip


def rows_from_fields(start: int, node: str, fields: dict[str, int]) -> list[UsageRow]:
    """Rows from ``{"<model>|<i|c|o|u|n>": count}`` (the Redis hash layout)."""
    per_model: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        model, _, kind = name.rpartition("|")
        if kind in _FIELD:
            per_model.setdefault(model, {})[_FIELD[kind]] = int(value)
    return [UsageRow(start, node, m, **v) for m, v in sorted(per_model.items())]
