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


def open_ledger(url: str, clock: Clock) -> Ledger:
    """``memory://`` today; ``redis://`` and ``redis+cluster://`` plug in here."""
    if url.startswith("memory://"):
        return MemoryLedger(clock)
    raise ValueError(f"unsupported ledger URL scheme: {url.split('://', 1)[0]}://")
