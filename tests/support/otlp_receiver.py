"""A real OTLP/gRPC receiver for tests, built from ``opentelemetry-proto``'s service stubs.

    with OtlpReceiver() as otlp:                 # binds 127.0.0.1 on a port the kernel picks
        ...  # point OTEL_EXPORTER_OTLP_ENDPOINT (or Envoy's tracer) at otlp.endpoint
        span = otlp.wait_span(lambda s: s.name == "authz.check")

It implements ``opentelemetry.proto.collector.trace.v1.TraceService/Export``,
``...logs.v1.LogsService/Export`` and ``...metrics.v1.MetricsService/Export`` the way a
collector does, and keeps what it was sent, flattened to :class:`Span`,
:class:`LogRecord` and :class:`MetricPoint` (sums and gauges) values. It runs on
grpc's own thread pool, so sync tests and the processes under test can both reach it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["LogRecord", "MetricPoint", "OtlpReceiver", "Span"]


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class Span:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0


@dataclass(frozen=True)
class LogRecord:
    service: str
    body: Any
    trace_id: str
    span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricPoint:
    service: str
    name: str
    attributes: dict[str, Any]
    value: float


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        points = []
        for rm in request.resource_metrics:
            service = str(_attrs(rm.resource.attributes).get("service.name", ""))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind not in ("sum", "gauge"):
                        continue
                    for p in getattr(m, kind).data_points:
                        value = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        points.append(MetricPoint(service, m.name, _attrs(p.attributes), value))
        self._sink._add_metrics(points)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for rs in request.resource_spans:
            service = str(_attrs(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        Span(
                            service=service,
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes=_attrs(s.attributes),
                            status_code=s.status.code,
                        )
                    )
        self._sink._add_spans(spans, request.ByteSize())
        return trace_service_pb2.ExportTraceServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        records = []
        for rl in request.resource_logs:
            service = str(_attrs(rl.resource.attributes).get("service.name", ""))
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    records.append(
                        LogRecord(
                            service=service,
                            body=_value(r.body),
                            trace_id=r.trace_id.hex(),
                            span_id=r.span_id.hex(),
                            attributes=_attrs(r.attributes),
                        )
                    )
        self._sink._add_logs(records)
        return logs_service_pb2.ExportLogsServiceResponse()


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._lock = threading.Condition()
        self._spans: list[Span] = []
        self._logs: list[LogRecord] = []
        self._metrics: list[MetricPoint] = []
        self.exports = 0
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (gRPC, plaintext)."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)
        self.port = server.add_insecure_port(f"{self._host}:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------- observation
    def _add_spans(self, spans: list[Span], _size: int) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.exports += 1
            self._lock.notify_all()

    def _add_logs(self, records: list[LogRecord]) -> None:
        with self._lock:
            self._logs.extend(records)
            self._lock.notify_all()

    def _add_metrics(self, points: list[MetricPoint]) -> None:
        with self._lock:
            self._metrics.extend(points)
            self._lock.notify_all()

    @property
    def metrics(self) -> list[MetricPoint]:
        with self._lock:
            return list(self._metrics)

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    @property
    def logs(self) -> list[LogRecord]:
        with self._lock:
            return list(self._logs)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._logs.clear()
            self._metrics.clear()

    def wait_spans(
        self, predicate: Callable[[Span], bool], count: int = 1, timeout: float = 10.0
    ) -> list[Span]:
        """At least ``count`` spans matching ``predicate``; TimeoutError lists what came."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                hits = [s for s in self._spans if predicate(s)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(s.service, s.name) for s in self._spans]
                    raise TimeoutError(
                        f"{len(hits)} of {count} matching spans after {timeout}s; got {seen}"
                    )
                self._lock.wait(left)

    def wait_span(self, predicate: Callable[[Span], bool], timeout: float = 10.0) -> Span:
        return self.wait_spans(predicate, 1, timeout)[0]
