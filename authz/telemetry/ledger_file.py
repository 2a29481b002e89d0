"""Metrics of the embedded sqlite ledger's write-behind, read from it at each scrape.

A failing disk does not stop checks (they are decided in memory), so these series are
how an operator learns that usage is piling up unwritten: alert on
``authz_ledger_file_pending_changes`` growing, or on any ``flush_failures``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["FlushStats", "LedgerFileCollector"]


class FlushStats(Protocol):
    @property
    def flushes(self) -> int: ...
    @property
    def flush_failures(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def last_flush_s(self) -> float: ...


class LedgerFileCollector(Collector):
    def __init__(self, ledger: FlushStats) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        led = self._ledger
        yield CounterMetricFamily(
            "authz_ledger_file_flushes", "Write-behind flushes written to the file", led.flushes
        )
        yield CounterMetricFamily(
            "authz_ledger_file_flush_failures",
            "Write-behind flushes that failed (their changes are kept and retried)",
            led.flush_failures,
        )
        yield GaugeMetricFamily(
            "authz_ledger_file_pending_changes",
            "Counters and reservations changed in memory, not yet in the file",
            led.pending,
        )
        yield GaugeMetricFamily(
            "authz_ledger_file_last_flush_seconds",
            "How long the last successful write took",
            led.last_flush_s,
        )
