"""The response path without Envoy: ResponseTracker rules and the ext_proc stream handler."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from authz.apis import Api
from authz.clock import FakeClock
from authz.enforcer import CheckInput, Enforcer
from authz.envoy.extproc import ExternalProcessorServicer
from authz.handles import Handle, HandleKeys
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore
from authz.proto import base_pb2, processing_mode_pb2
from authz.proto import external_processor_pb2 as pb
from authz.settle import BodyMode, ReservationInfo, ResponseTracker
from authz.telemetry.metrics import Metrics
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit
BODIES = Path(__file__).parent.parent / "fixtures" / "bodies"
KEYS = HandleKeys.random()  # what Check would sign with (authz.handles)
INFO = ReservationInfo(
    "r1@acme", Api.OPENAI_CHAT, input_estimate=40, output_reserved=500, org="acme"
)


def test_json_settles_reported_usage() -> None:
    t = ResponseTracker(INFO)
    assert t.on_headers(200, "application/json", "") is BodyMode.BUFFERED
    out = t.on_body((BODIES / "openai_chat.json").read_bytes(), True)
    assert out is not None and out.kind == "settled" and out.usage.exact


def test_gzip_json_is_decompressed() -> None:
    raw = (BODIES / "openai_chat.json").read_bytes()
    plain = ResponseTracker(INFO)
    plain.on_headers(200, "application/json", "")
    zipped = ResponseTracker(INFO)
    zipped.on_headers(200, "application/json", "gzip")
    data = gzip.compress(raw)
    zipped.on_body(data[:10], False)
    out = zipped.on_body(data[10:], True)
    assert out is not None and out == plain.on_body(raw, True)


def test_json_without_usage_keeps_estimate_never_zero() -> None:
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "")
    out = t.on_body(b'{"id": "x"}', True)
    assert out is not None and out.kind == "estimated"
    assert out.usage == TokenUsage(40, 0, 500, exact=False)


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_non_2xx_releases(status: int) -> None:
    t = ResponseTracker(INFO)
    assert t.on_headers(status, "application/json", "") is BodyMode.NONE
    assert t.outcome is not None and t.outcome.kind == "released" and t.outcome.usage.total == 0


def test_sse_complete_and_aborted() -> None:
    raw = (BODIES / "openai_chat_stream.sse").read_bytes()
    t = ResponseTracker(INFO)
    assert t.on_headers(200, "text/event-stream; charset=utf-8", "") is BodyMode.STREAMED
    for i in range(0, len(raw), 7):
        out = t.on_body(raw[i : i + 7], False)
        assert out is None
    done = t.on_body(b"", True)
    assert done is not None and done.kind == "settled" and done.usage == TokenUsage(139, 1152, 12)

    cut = ResponseTracker(INFO)
    cut.on_headers(200, "text/event-stream", "")
    cut.on_body(raw[: len(raw) // 2], False)
    aborted = cut.on_abort()
    assert aborted.kind == "aborted" and not aborted.usage.exact
    assert aborted.usage.input_tokens == 40 and 0 < aborted.usage.output_tokens < 500


def test_stream_closed_after_its_usage_is_settled_not_aborted() -> None:
    # The openai SDK's sync stream closes at [DONE]: Envoy may then never send
    # end_of_stream. The usage chunk came before it: exact, and a whole answer.
    raw = (BODIES / "openai_chat_stream.sse").read_bytes()
    t = ResponseTracker(INFO)
    t.on_headers(200, "text/event-stream", "")
    assert t.on_body(raw[: raw.index(b"data: [DONE]")], False) is None
    out = t.on_abort()
    assert out.kind == "settled" and out.usage == TokenUsage(139, 1152, 12)


def test_abort_before_headers_keeps_reservation() -> None:
    out = ResponseTracker(INFO).on_abort()
    assert out.usage == TokenUsage(40, 0, 500, exact=False)


# -- the gRPC stream handler, fed a scripted stream ------------------------------------


def _policy(tmp_path: Path) -> Path:
    digest = hashlib.sha256(b"k").hexdigest()
    path = tmp_path / "p.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: k, sha256: {digest}, claims: {{org_id: acme, sub: u}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets: [{{name: u, match: {{user: "*"}}, tokens: 100000, period: day}}]
models:
  rules: [{{match: "gpt-*", max_output_tokens: 100}}]
""")
    return path


def _meta(rid: str) -> pb.ProcessingRequest:
    if not rid:  # a local reply (our own 401/429): ext_authz left no reservation
        return pb.ProcessingRequest()
    s = struct_pb2.Struct()
    s.update(
        {
            "reservation_id": rid,
            "api": "openai.chat",
            "input_estimate": 10,
            "output_reserved": 100,
            "org": "acme",
            "model": "gpt-4o",
            "mac": KEYS.sign(Handle(rid, "", "acme", "openai.chat", "gpt-4o", 10, 100, False)),
        }
    )
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(s)
    return req


def _headers(status: int, ctype: str) -> pb.ProcessingRequest:
    hs = [
        base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
        base_pb2.HeaderValue(key="content-type", raw_value=ctype.encode()),
    ]
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs))
    )


async def _run(
    servicer: ExternalProcessorServicer,
    msgs: list[pb.ProcessingRequest],
    rid: str,
    stop_after: int | None = None,
) -> list[pb.ProcessingResponse]:
    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for m in msgs:
            merged = _meta(rid)
            merged.MergeFrom(m)
            yield merged

    out = []
    gen = servicer.Process(stream(), None)  # type: ignore[arg-type]
    async for resp in gen:
        out.append(resp)
        if stop_after is not None and len(out) == stop_after:
            await gen.aclose()  # what a cancelled RPC does to the handler
            break
    await servicer.drain()
    return out


@pytest.fixture
async def setup(tmp_path: Path) -> tuple[Enforcer, ExternalProcessorServicer, MemoryLedger]:
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    enf = Enforcer(PolicyStore(_policy(tmp_path)), ledger, clock)
    return enf, ExternalProcessorServicer(enf, Metrics(), handles=KEYS), ledger


async def _reserve(enf: Enforcer, body: bytes) -> str:
    d = await enf.check(
        CheckInput("POST", "/v1/chat/completions", {"authorization": "Bearer k"}, body)
    )
    assert d.reservation_id
    return d.reservation_id


async def test_stream_answers_every_message_and_settles(setup) -> None:  # type: ignore[no-untyped-def]
    enf, servicer, ledger = setup
    body = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    rid = await _reserve(enf, body)
    raw = (BODIES / "openai_chat_stream.sse").read_bytes()
    msgs = [
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        _headers(200, "text/event-stream"),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=raw[:100])),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=raw[100:], end_of_stream=True)),
    ]
    out = await _run(servicer, msgs, rid)
    assert [r.WhichOneof("response") for r in out] == [
        "request_body",
        "response_headers",
        "response_body",
        "response_body",
    ]
    mutated = out[0].request_body.response.body_mutation.body
    assert b'"include_usage":true' in mutated
    assert out[1].mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED
    assert (
        out[3].dynamic_metadata.fields["authz.usage"].struct_value.fields["output"].number_value
        == 12
    )
    assert ledger.open_reservations == 0


async def test_cancelled_stream_still_settles(setup) -> None:  # type: ignore[no-untyped-def]
    enf, servicer, ledger = setup
    rid = await _reserve(enf, b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}')
    raw = (BODIES / "openai_chat_stream.sse").read_bytes()
    msgs = [
        _headers(200, "text/event-stream"),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=raw[:400])),
    ]
    await _run(servicer, msgs, rid, stop_after=2)
    assert ledger.open_reservations == 0


async def test_json_buffered_and_local_reply_untouched(setup) -> None:  # type: ignore[no-untyped-def]
    enf, servicer, _ = setup
    out = await _run(servicer, [_headers(429, "application/json")], rid="")
    assert out[0].mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.NONE
    assert not servicer._pending
    rid = await _reserve(enf, b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}')
    out = await _run(servicer, [_headers(200, "application/json")], rid)
    assert out[0].mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    await asyncio.sleep(0)
