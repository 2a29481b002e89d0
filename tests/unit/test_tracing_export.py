"""Spans leave the process over both OTLP transports, configured only by OTEL_* variables."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from authz.telemetry.otel import start_otel
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.integration


class HttpOtlp:
    """An OTLP/HTTP (protobuf) trace receiver on loopback."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.paths: list[str] = []
        me = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                me.paths.append(self.path)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        me.names.extend(s.name for s in ss.spans)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def http_otlp() -> Iterator[HttpOtlp]:
    h = HttpOtlp()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def test_http_protobuf_export(http_otlp: HttpOtlp, monkeypatch: pytest.MonkeyPatch) -> None:
    port = http_otlp.server.server_address[1]
    # Only the endpoint: OTLP over HTTP/protobuf is the default transport.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    setup = start_otel()
    with setup.tracer.start_as_current_span("authz.check"):
        pass
    setup.shutdown()  # flushes the batch
    assert http_otlp.names == ["authz.check"] and http_otlp.paths == ["/v1/traces"]


def test_grpc_export(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpReceiver() as otlp:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        setup = start_otel()
        with setup.tracer.start_as_current_span("authz.settle"):
            pass
        setup.shutdown()
        span = otlp.wait_span(lambda s: s.name == "authz.settle", timeout=5)
        assert span.service == "authz"
