"""The directory's counters at each scrape (:class:`~authz.directory.stats.DirectoryStats`).

Read, not pushed: the lookups run on worker threads and the stats object outlives each
directory a reload makes, so a collector reading it is simpler than counters fed from
every path. Every series exists (at zero) from the start, even with no directory in
the policy, so dashboards and alert rules see the same names on every deployment.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from authz.directory.stats import CACHE_RESULTS, LOOKUP_OUTCOMES, DirectoryStats

__all__ = ["DIRECTORY_METRIC_NAMES", "DirectoryCollector"]

DIRECTORY_METRIC_NAMES = (
    "authz_directory_lookups_total",
    "authz_directory_cache_total",
    "authz_directory_up",
    "authz_directory_cached_subjects",
)


class DirectoryCollector(Collector):
    def __init__(self, stats: DirectoryStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        lookups = CounterMetricFamily(
            "authz_directory_lookups",
            "Directory (LDAP) lookups by outcome: found, not_found, error, timeout",
            labels=["outcome"],
        )
        for outcome in LOOKUP_OUTCOMES:
            lookups.add_metric([outcome], s.lookups[outcome])
        yield lookups
        cache = CounterMetricFamily(
            "authz_directory_cache",
            "What the directory cache answered a check: hit, negative_hit, miss, expired,"
            " or while the directory was down last_known, fallback, denied",
            labels=["result"],
        )
        for result in CACHE_RESULTS:
            cache.add_metric([result], s.answers[result])
        yield cache
        yield GaugeMetricFamily(
            "authz_directory_up",
            "1 if the directory answered its last lookup (or none is configured), else 0",
            value=int(s.up or not s.configured),
        )
        yield GaugeMetricFamily(
            "authz_directory_cached_subjects", "Subjects in the directory cache", value=s.entries
        )
