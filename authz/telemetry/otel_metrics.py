"""The Prometheus metrics, also exported through OpenTelemetry when OTel metrics are on.

One set of instruments is kept (prometheus_client, on the request path); this bridge
registers an *observable* OTel instrument per metric family whose callback reads the
Prometheus registry at each OTel export (``OTEL_METRIC_EXPORT_INTERVAL``, default 60 s),
so the request path pays nothing extra. Counters become cumulative observable counters
(same name, without ``_total``), gauges observable gauges, and a histogram becomes two
counters, ``<name>_count`` and ``<name>_sum`` (OTel has no observable histogram; the
buckets stay on ``/metrics``). Label names become attribute names unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry

__all__ = ["bridge_to_otel"]


class _Snapshot:
    """One registry collection shared by all callbacks of one export (not one each)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._at = 0.0
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def get(self, sample_name: str) -> list[tuple[dict[str, str], float]]:
        now = time.monotonic()
        if now - self._at > 0.5:
            samples: dict[str, list[tuple[dict[str, str], float]]] = {}
            for family in self._registry.collect():
                for s in family.samples:
                    samples.setdefault(s.name, []).append((dict(s.labels), s.value))
            self._samples, self._at = samples, now
        return self._samples.get(sample_name, [])


def bridge_to_otel(registry: CollectorRegistry, meter_provider: Any) -> int:
    """Register the observable instruments; returns how many."""
    from opentelemetry.metrics import CallbackOptions, Observation

    meter = meter_provider.get_meter("authz")
    snapshot = _Snapshot(registry)

    def reader(sample_name: str) -> Any:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(v, labels) for labels, v in snapshot.get(sample_name)]

        return callback

    count = 0
    for family in registry.collect():
        name, doc = family.name, family.documentation
        if family.type == "counter":
            meter.create_observable_counter(name, [reader(name + "_total")], description=doc)
            count += 1
        elif family.type == "gauge":
            meter.create_observable_gauge(name, [reader(name)], description=doc)
            count += 1
        elif family.type == "histogram":
            unit = "s" if name.endswith("_seconds") else ""
            for part in ("_count", "_sum"):
                meter.create_observable_counter(
                    name + part, [reader(name + part)], unit=unit, description=doc
                )
                count += 1
    return count
