"""Quota storage behind one contract (:class:`Ledger`), chosen by URL."""

from __future__ import annotations

from authz.clock import Clock
from authz.ledger.base import Balance, Ledger, Limit, Refusal, Reservation, SettleOutcome
from authz.ledger.memory import MemoryLedger

__all__ = [
    "Balance",
    "Ledger",
    "Limit",
    "MemoryLedger",
    "Refusal",
    "Reservation",
    "SettleOutcome",
    "open_ledger",
]


def open_ledger(url: str, clock: Clock, *, state_dir: str = ".") -> Ledger:
    """``memory://``, ``sqlite:///path.db`` (relative to ``state_dir``; see
    :mod:`authz.ledger.sqlite`: locked and loaded here, raising ``LedgerLocked`` if another
    process has the file), or ``redis://`` / ``rediss://`` / ``redis+cluster://`` (see
    :mod:`authz.ledger.redis.config`; with ``lease=on``, wrapped in edge
    leases). ``ValueError`` for a bad URL; nothing connects until the first call."""
    if url.startswith("memory://"):
        return MemoryLedger(clock)
    if url.startswith("sqlite:"):
        from authz.ledger.sqlite import SqliteLedger, parse_sqlite_url

        return SqliteLedger(parse_sqlite_url(url, state_dir), clock)
    from authz.ledger.redis.config import parse_redis_url
    from authz.ledger.redis.ledger import RedisLedger

    opts = parse_redis_url(url)
    redis_ledger = RedisLedger(opts, clock)
    if not opts.lease.enabled:
        return redis_ledger
    from authz.ledger.lease import LeasedLedger

    return LeasedLedger(redis_ledger, clock, opts.lease)
