"""Tracing: configuration from OTEL_*, parents, attributes, child spans, sampling, logs."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from authz.clock import FakeClock
from authz.enforcer import Enforcer
from authz.envoy.authz import AuthorizationServicer
from authz.envoy.extproc import ExternalProcessorServicer
from authz.handles import HandleKeys
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore
from authz.proto import attribute_context_pb2, base_pb2, external_auth_pb2
from authz.proto import external_processor_pb2 as pb
from authz.telemetry.logging import JsonFormatter, trace_ids
from authz.telemetry.metrics import Metrics
from authz.telemetry.otel import signal_config, start_otel
from authz.telemetry.tracing import TracedLedger, Tracing

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ENVOY_SPAN = "00f067aa0ba902b7"
CLIENT_SPAN = "b7ad6b7169203331"
BODY = {"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


# --------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),  # off unless configured
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ("otlp", "http/protobuf")),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp", "http/protobuf")),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("otlp", "grpc")),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
          "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, ("otlp", "http/protobuf")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console", "http/protobuf")),
    ],
)  # fmt: skip
def test_signal_config_follows_the_otel_variables(
    env: dict[str, str], expected: tuple[str, str] | None
) -> None:
    cfg = signal_config("traces", env)
    assert (None if cfg is None else (cfg.exporter, cfg.protocol)) == expected


@pytest.mark.parametrize(
    "env",
    [{"OTEL_TRACES_EXPORTER": "zipkin"},
     {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}],
)  # fmt: skip
def test_signal_config_rejects_what_it_cannot_do(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="OTEL_"):
        signal_config("traces", env)


def test_nothing_starts_without_otel_settings() -> None:
    setup = start_otel({})
    assert setup.tracer is None and setup.logger_provider is None and setup.meter_provider is None


def test_grpc_and_http_exporters_are_chosen_by_protocol() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    for protocol, kind in (("grpc", Grpc), ("http/protobuf", Http)):
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        setup = start_otel(env)
        processor = setup.tracer_provider._active_span_processor._span_processors[0]
        assert isinstance(processor.span_exporter, kind)
        setup.shutdown()


# --------------------------------------------------------------------- the servicers


class Ctx:
    """The part of grpc.aio.ServicerContext the servicers use."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self._metadata = tuple(metadata.items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


@pytest.fixture
def spans() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider.get_tracer("test")), exporter
    provider.shutdown()


def _policy(tmp_path: Path) -> Path:
    key = hashlib.sha256(b"k-ann").hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {key}, claims: {{org_id: acme, department: ml, sub: ann}}}}]
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: dept-day, match: {{department: "*"}}, tokens: 100000, period: day}}
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000, period: day, over_reserve: deny}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
""")
    return path


def _check_request(headers: dict[str, str], body: dict[str, Any] = BODY) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", raw_body=json.dumps(body).encode(),
        headers={"authorization": "Bearer k-ann", "content-type": "application/json", **headers},
    )  # fmt: skip
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def _build(tmp_path: Path, tracing: Tracing | None) -> tuple[Enforcer, Any, Any]:
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    traced = TracedLedger(ledger, tracing.tracer) if tracing else ledger
    enforcer = Enforcer(PolicyStore(_policy(tmp_path)), traced, clock)  # type: ignore[arg-type]
    metrics = Metrics()
    keys = HandleKeys.random()
    return (
        enforcer,
        AuthorizationServicer(enforcer, metrics, tracing, handles=keys),
        ExternalProcessorServicer(enforcer, metrics, tracing, handles=keys),
    )


def _by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


async def test_check_span_is_the_child_of_envoys_grpc_span(
    tmp_path: Path, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    _, servicer, _ = _build(tmp_path, tracing)
    ctx = Ctx({"traceparent": f"00-{TRACE}-{ENVOY_SPAN}-01"})
    # The client's own traceparent (in the HTTP headers) loses to Envoy's span.
    resp = await servicer.Check(_check_request({"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}), ctx)
    found = _by_name(exporter)
    check, reserve = found["authz.check"], found["authz.ledger.reserve"]
    assert _hex(check.context.trace_id, 32) == TRACE
    assert check.parent is not None and _hex(check.parent.span_id, 16) == ENVOY_SPAN
    assert reserve.parent is not None and reserve.parent.span_id == check.context.span_id
    a = dict(check.attributes or {})
    assert a["authz.verdict"] == "allow" and a["authz.subject"] == "org:acme/department:ml/user:ann"
    assert a["gen_ai.request.model"] == "gpt-4o" and a["gen_ai.operation.name"] == "chat"
    assert a["authz.budget"] == "user-day" and a["authz.model_rule"] == "gpt-*"
    assert a["authz.reserved.output_tokens"] == 20
    # ext_proc's fallback parent rides in the dynamic metadata
    tp = resp.dynamic_metadata.fields["traceparent"].string_value
    assert tp == f"00-{TRACE}-{_hex(check.context.span_id, 16)}-01"


async def test_check_span_falls_back_to_the_request_traceparent(
    tmp_path: Path, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    _, servicer, _ = _build(tmp_path, tracing)
    await servicer.Check(_check_request({"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}), Ctx({}))
    check = _by_name(exporter)["authz.check"]
    assert check.parent is not None and _hex(check.parent.span_id, 16) == CLIENT_SPAN


async def test_denied_check_records_reason_and_deciding_budget(
    tmp_path: Path, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    _, servicer, _ = _build(tmp_path, tracing)
    await servicer.Check(_check_request({}, {**BODY, "max_tokens": 5000}), Ctx({}))
    found = _by_name(exporter)
    a = dict(found["authz.check"].attributes or {})
    assert (a["authz.verdict"], a["authz.reason"], a["authz.budget"]) == (
        "deny", "budget_exhausted", "user-day",
    )  # fmt: skip
    assert a["authz.budget.node"] == "org:acme/department:ml/user:ann"
    assert dict(found["authz.ledger.reserve"].attributes or {})["authz.ledger.outcome"] == "refused"


async def test_sampled_out_parent_means_no_spans(
    tmp_path: Path, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    _, servicer, _ = _build(tmp_path, tracing)
    resp = await servicer.Check(_check_request({}), Ctx({"traceparent": f"00-{TRACE}-{ENVOY_SPAN}-00"}))
    assert exporter.get_finished_spans() == ()  # parent-based: Envoy said "not sampled"
    assert resp.status.code == 0


async def test_sampler_from_the_environment_is_respected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = TracerProvider()
    assert provider.sampler is ALWAYS_OFF


async def test_settle_span_joins_the_check_trace_without_envoy_tracing(
    tmp_path: Path, spans: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = spans
    _, servicer, extproc = _build(tmp_path, tracing)
    resp = await servicer.Check(_check_request({"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}), Ctx({}))
    fields = resp.dynamic_metadata.fields
    rid = fields["reservation_id"].string_value
    assert fields["traceparent"].string_value  # ext_proc's fallback parent rides along
    body = json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
    hs = [base_pb2.HeaderValue(key=":status", raw_value=b"200"),
          base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")]  # fmt: skip
    msgs = [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]

    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for m in msgs:
            # What Envoy forwards: Check's metadata as is (the signed handle, traceparent).
            m.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(
                resp.dynamic_metadata
            )
            yield m

    async for _ in extproc.Process(stream(), Ctx({})):
        pass
    await extproc.drain()
    found = _by_name(exporter)
    check, settle, ledger_settle = (
        found["authz.check"], found["authz.settle"], found["authz.ledger.settle"],
    )  # fmt: skip
    assert settle.parent is not None and settle.parent.span_id == check.context.span_id
    assert settle.context.trace_id == check.context.trace_id
    assert ledger_settle.parent is not None and ledger_settle.parent.span_id == settle.context.span_id
    a = dict(settle.attributes or {})
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (7, 3)
    assert a["authz.settle.outcome"] == "settled" and a["authz.reservation_id"] == rid


async def test_tracing_off_builds_no_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("tracing is off: nothing of it may run")

    for name in ("start_check", "decided", "start_stream", "settled"):
        monkeypatch.setattr(Tracing, name, boom)
    monkeypatch.setattr("opentelemetry.trace.use_span", boom)
    _, servicer, _ = _build(tmp_path, None)
    resp = await servicer.Check(_check_request({"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}),
                                Ctx({"traceparent": f"00-{TRACE}-{ENVOY_SPAN}-01"}))  # fmt: skip
    assert resp.status.code == 0 and "traceparent" not in resp.dynamic_metadata.fields


# --------------------------------------------------------------------------- logs


def test_log_lines_inside_a_span_carry_its_ids(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = spans
    record = logging.LogRecord("authz.check", logging.INFO, "", 0, "decision", None, None)
    with tracing.tracer.start_as_current_span("s") as span:
        line = json.loads(JsonFormatter().format(record))
    ctx = span.get_span_context()
    assert line["trace_id"] == _hex(ctx.trace_id, 32) and line["span_id"] == _hex(ctx.span_id, 16)
    assert "trace_id" not in json.loads(JsonFormatter().format(record))


def test_trace_ids_from_metadata_or_headers() -> None:
    tp = f"00-{TRACE}-{ENVOY_SPAN}-01"
    assert trace_ids((("traceparent", tp),)) == (TRACE, ENVOY_SPAN)
    assert trace_ids((), {"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-00"}) == (TRACE, CLIENT_SPAN)
    for bad in ("garbage", f"00-{'0' * 32}-{ENVOY_SPAN}-01", f"00-{TRACE[:-1]}X-{ENVOY_SPAN}-01"):
        assert trace_ids((("traceparent", bad),)) is None


async def test_decision_log_without_tracing_names_the_request_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, servicer, _ = _build(tmp_path, None)
    caplog.set_level(logging.INFO, "authz.check")
    await servicer.Check(_check_request({}, {**BODY, "max_tokens": 5000}),
                         Ctx({"traceparent": f"00-{TRACE}-{ENVOY_SPAN}-01"}))  # fmt: skip
    rec = next(r for r in caplog.records if r.getMessage() == "decision")
    assert (rec.trace_id, rec.parent_span_id) == (TRACE, ENVOY_SPAN)  # type: ignore[attr-defined]
    assert rec.budget == "user-day" and "k-ann" not in JsonFormatter().format(rec)  # type: ignore[attr-defined]
