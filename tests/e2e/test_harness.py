"""The e2e harness proves itself without the authz service.

(a) The fake LLM satisfies the real openai/anthropic SDKs, and the usage they parse is
    what the fake recorded. (b) The shipped envoy/envoy.yaml, rewritten only in its
    ports, runs a real Envoy whose ext_authz + ext_proc hit a stub gRPC server here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import httpx
import openai
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from authz.proto import base_pb2, external_auth_pb2, external_auth_pb2_grpc, processing_mode_pb2
from authz.proto import external_processor_pb2 as ext_proc_pb2
from authz.proto import external_processor_pb2_grpc as ext_proc_grpc
from tests.support.envoy_proc import (
    ENVOY_YAML,
    REPO_ROOT,
    EnvoyProcess,
    add_jwt_authn,
    envoy_binary,
    http_filter,
    render_envoy_config,
)
from tests.support.fake_llm import FakeLLM, FakeLLMThread
from tests.support.ports import free_port
from tests.support.procs import BackgroundLoop, HarnessError, wait_until
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "hello"}]
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


# ------------------------------------------------------------------ stub authz service


@dataclass
class StubStream:
    """One ext_proc stream as the stub saw it."""

    kinds: list[str] = field(default_factory=list)
    authz_metadata: dict[str, Any] | None = None  # forwarded envoy.filters.http.ext_authz
    response_code: Any = None  # the response.code attribute
    response_body: bytearray = field(default_factory=bytearray)
    end_of_stream: bool = False
    end: str = "open"  # "eof" (clean half-close) or "cancelled"


class StubAuthz(
    external_auth_pb2_grpc.AuthorizationServicer, ext_proc_grpc.ExternalProcessorServicer
):
    """Always allows; adds an upstream header and metadata; answers ext_proc with no-ops."""

    def __init__(self) -> None:
        self.checks: list[external_auth_pb2.CheckRequest] = []
        self.streams: list[StubStream] = []
        self.buffer_responses = False  # answer response headers as the service does for JSON

    def reset(self) -> None:
        self.checks.clear()
        self.streams.clear()
        self.buffer_responses = False

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.checks.append(request)
        metadata = struct_pb2.Struct()
        metadata.update({"reservation": f"r-{len(self.checks)}", "subject": "harness"})
        header = base_pb2.HeaderValue(key="x-authz-subject", value="harness")
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[base_pb2.HeaderValueOption(header=header)]
            ),
            dynamic_metadata=metadata,
        )

    async def Process(
        self,
        request_iterator: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_proc_pb2.ProcessingResponse]:
        stream = StubStream()
        self.streams.append(stream)
        try:
            async for request in request_iterator:
                yield self._answer(stream, request)
            stream.end = "eof"
        except asyncio.CancelledError:
            stream.end = "cancelled"
            raise

    def _answer(
        self, stream: StubStream, request: ext_proc_pb2.ProcessingRequest
    ) -> ext_proc_pb2.ProcessingResponse:
        kind = request.WhichOneof("request")
        stream.kinds.append(kind)
        forwarded = request.metadata_context.filter_metadata.get("envoy.filters.http.ext_authz")
        if forwarded is not None:
            stream.authz_metadata = json_format.MessageToDict(forwarded)
        if kind == "response_headers":
            # attributes: map of filter name -> Struct of the requested attribute values
            attributes = request.attributes.get("envoy.filters.http.ext_proc")
            if attributes is not None:
                stream.response_code = json_format.MessageToDict(attributes).get("response.code")
            answer = ext_proc_pb2.ProcessingResponse(
                response_headers=ext_proc_pb2.HeadersResponse()
            )
            if self.buffer_responses:
                answer.mode_override.response_body_mode = BUFFERED
            return answer
        if kind == "response_body":
            stream.response_body += request.response_body.body
            answer = ext_proc_pb2.ProcessingResponse(response_body=ext_proc_pb2.BodyResponse())
            if request.response_body.end_of_stream:
                stream.end_of_stream = True
                answer.dynamic_metadata.update(
                    {"authz.usage": {"body_bytes": len(stream.response_body)}}
                )
            return answer
        if kind == "request_body":
            return ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse())
        if kind == "request_headers":
            return ext_proc_pb2.ProcessingResponse(request_headers=ext_proc_pb2.HeadersResponse())
        if kind == "request_trailers":
            return ext_proc_pb2.ProcessingResponse(request_trailers=ext_proc_pb2.TrailersResponse())
        return ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse())


@dataclass
class StubServer:
    stub: StubAuthz
    port: int


@pytest.fixture(scope="module")
def stub_server() -> Iterator[StubServer]:
    # Its own loop thread: the tests below are sync and block while Envoy calls the stub.
    loop = BackgroundLoop("stub-authz")
    stub = StubAuthz()

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(stub, server)
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(stub, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    try:
        server, port = loop.run(serve())
        try:
            yield StubServer(stub, port)
        finally:
            loop.run(server.stop(None))
    finally:
        loop.close()


@pytest.fixture(scope="module")
def authz_port(stub_server: StubServer) -> int:
    """Points the conftest's Envoy at the stub instead of the real service."""
    return stub_server.port


@pytest.fixture
def stub(stub_server: StubServer) -> StubAuthz:
    stub_server.stub.reset()
    return stub_server.stub


def _only_stream_closed(stub: StubAuthz) -> StubStream:
    """The one ext_proc stream of the test, once Envoy has closed it.

    The SDKs stop reading at [DONE]/message_stop, so the test can get here before Envoy
    has sent ext_proc the final end_of_stream message: wait for the stream to end.
    """
    [stream] = stub.streams
    wait_until(lambda: stream.end != "open", timeout=5, what="the ext_proc stream to close")
    return stream


def _openai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def _anthropic(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)


# ----------------------------------------------------------------- (a) fake LLM direct


def test_openai_chat_usage_matches_record(fake_llm: FakeLLMThread) -> None:
    with _openai(fake_llm.url) as client:
        reply = client.chat.completions.create(
            model="gpt-test",
            messages=CHAT,
            extra_headers={
                "x-fake-words": "7",
                "x-fake-prompt-tokens": "42",
                "x-fake-cached-tokens": "12",
            },
        )
    [record] = fake_llm.wait_records(1)
    assert reply.choices[0].message.content == "alpha bravo charlie delta echo foxtrot golf"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == record.prompt_tokens == 42
    assert reply.usage.completion_tokens == record.output_tokens == 7
    assert reply.usage.total_tokens == 49
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == record.cached_tokens == 12
    assert (record.path, record.model, record.stream, record.completed) == (
        "/v1/chat/completions", "gpt-test", False, True,
    )  # fmt: skip


def test_openai_stream_reports_usage_only_with_include_usage(fake_llm: FakeLLMThread) -> None:
    with _openai(fake_llm.url) as client:
        with client.chat.completions.create(
            model="gpt-test",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-words": "4"},
        ) as stream:
            chunks = list(stream)
        with client.chat.completions.create(model="gpt-test", messages=CHAT, stream=True) as bare:
            bare_chunks = list(bare)
    with_usage, without = fake_llm.wait_records(2)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha bravo charlie delta"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == with_usage.prompt_tokens == 10
    assert chunks[-1].usage.completion_tokens == with_usage.output_tokens == 4
    assert with_usage.include_usage and with_usage.usage_reported and with_usage.completed

    assert all(c.usage is None for c in bare_chunks)
    assert not without.include_usage and not without.usage_reported and without.completed


def test_max_tokens_caps_the_reply(fake_llm: FakeLLMThread) -> None:
    with _openai(fake_llm.url) as client:
        reply = client.chat.completions.create(
            model="m", messages=CHAT, max_completion_tokens=3, extra_headers={"x-fake-words": "9"}
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert fake_llm.wait_records(1)[0].output_tokens == 3


def test_openai_other_endpoints(fake_llm: FakeLLMThread) -> None:
    with _openai(fake_llm.url) as client:
        legacy = client.completions.create(
            model="m", prompt="hi", extra_headers={"x-fake-words": "2"}
        )
        vectors = client.embeddings.create(model="e", input=["a", "b", "c"])  # base64 by default
        response = client.responses.create(
            model="m", input="hi", extra_headers={"x-fake-reasoning-tokens": "5"}
        )
        with client.responses.stream(model="m", input="hi") as events:
            for _ in events:
                pass
            streamed = events.get_final_response()
    records = fake_llm.wait_records(4)

    assert legacy.choices[0].text == "alpha bravo"
    assert legacy.usage is not None and legacy.usage.completion_tokens == records[0].output_tokens
    assert len(vectors.data) == 3 and len(vectors.data[0].embedding) == 8
    assert vectors.usage.prompt_tokens == records[1].prompt_tokens and records[1].output_tokens == 0
    assert response.output_text == "alpha bravo charlie delta echo"
    assert response.usage is not None
    assert response.usage.output_tokens == records[2].output_tokens == 10  # 5 words + 5 reasoning
    assert response.usage.output_tokens_details.reasoning_tokens == records[2].reasoning_tokens == 5
    assert streamed.output_text == "alpha bravo charlie delta echo"
    assert streamed.usage is not None
    assert streamed.usage.input_tokens == records[3].prompt_tokens
    assert streamed.usage.output_tokens == records[3].output_tokens == 5
    assert records[3].stream and records[3].usage_reported and records[3].completed


def test_anthropic_message_and_stream_usage_match_records(fake_llm: FakeLLMThread) -> None:
    fake_usage = {"x-fake-prompt-tokens": "30", "x-fake-cached-tokens": "20", "x-fake-words": "6"}
    with _anthropic(fake_llm.url) as client:
        message = client.messages.create(
            model="claude-test", max_tokens=100, messages=CHAT, extra_headers=fake_usage
        )
        with client.messages.stream(
            model="claude-test", max_tokens=100, messages=CHAT, extra_headers=fake_usage
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    plain, streamed = fake_llm.wait_records(2)

    for parsed, record in ((message, plain), (final, streamed)):
        usage = parsed.usage
        total_in = (
            usage.input_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )
        assert total_in == record.prompt_tokens == 30
        assert usage.cache_read_input_tokens == record.cached_tokens == 20
        assert usage.output_tokens == record.output_tokens == 6
        assert parsed.stop_reason == "end_turn"
    assert text == "alpha bravo charlie delta echo foxtrot"
    assert streamed.stream and streamed.completed and streamed.usage_reported


def test_error_status_and_gzip(fake_llm: FakeLLMThread) -> None:
    with _openai(fake_llm.url) as client:
        with pytest.raises(openai.RateLimitError) as denied:
            client.chat.completions.create(
                model="m", messages=CHAT, extra_headers={"x-fake-status": "429"}
            )
        zipped = client.chat.completions.with_raw_response.create(
            model="m", messages=CHAT, extra_headers={"x-fake-gzip": "1"}
        )
    with _anthropic(fake_llm.url) as claude, pytest.raises(anthropic.InternalServerError):
        claude.messages.create(
            model="c", max_tokens=5, messages=CHAT, extra_headers={"x-fake-status": "500"}
        )
    error, ok, anthropic_error = fake_llm.wait_records(3)

    assert denied.value.status_code == 429 and error.status == 429
    assert not error.usage_reported and error.output_tokens == 0
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.parse().usage is not None and ok.status == 200
    assert anthropic_error.status == 500


def test_client_disconnect_marks_record_incomplete(fake_llm: FakeLLMThread) -> None:
    slow = {"x-fake-words": "200", "x-fake-chunk-delay-ms": "10"}
    body = {"model": "m", "messages": CHAT, "stream": True}
    with (
        httpx.Client() as client,
        client.stream("POST", fake_llm.url + "/v1/chat/completions", json=body, headers=slow) as r,
    ):
        next(r.iter_lines())
    [record] = fake_llm.wait_records(1)
    assert record.stream and not record.completed and not record.usage_reported
    assert record.output_tokens < 200


# ------------------------------------------------------------------- Envoy config file


def test_shipped_envoy_yaml_validates() -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_YAML)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


def test_rendered_config_with_jwt_authn_validates(tmp_path: Path) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        add_jwt_authn(
            cfg,
            issuer="https://issuer.test",
            audiences=["llm"],
            local_jwks='{"keys":[{"kty":"oct","alg":"HS256","kid":"k","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}',
        )
        http_filter(cfg, "envoy.filters.http.ext_authz")["grpc_service"]["timeout"] = "1s"

    path = render_envoy_config(
        listen_port=1,
        admin_port=2,
        authz_port=3,
        upstream_port=4,
        out_path=tmp_path / "envoy.yaml",
        mutate=mutate,
    )
    text = path.read_text()
    assert "0.0.0.0" not in text and "envoy.filters.http.jwt_authn" in text
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_repo_envoy_folder_does_not_shadow_the_protos() -> None:
    assert not (REPO_ROOT / "envoy" / "__init__.py").exists()
    subprocess.run(
        [sys.executable, "-c", "import authz.proto.external_auth_pb2"],
        cwd=REPO_ROOT,
        check=True,
        timeout=60,
    )


def test_envoy_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("static_resources: {listeners: [{name: x}]}\n")
    with pytest.raises(HarnessError, match="exited"):
        EnvoyProcess(broken).start()


def test_service_that_cannot_start_fails_fast_with_its_stderr(tmp_path: Path) -> None:
    service = AuthzService(tmp_path / "missing-config.yaml")
    with pytest.raises(HarnessError, match="exited"):
        service.start()
    assert service.returncode not in (None, 0)


async def test_async_lifecycle_and_fail_closed_without_authz(tmp_path: Path) -> None:
    """FakeLLM and EnvoyProcess on the test's own loop; nothing listens on the authz port."""
    fake = FakeLLM()
    await fake.start()
    try:
        config = render_envoy_config(
            listen_port=0,
            admin_port=0,
            authz_port=free_port(),
            upstream_port=fake.port,
            out_path=tmp_path / "envoy.yaml",
        )
        async with EnvoyProcess(config) as envoy, aiohttp.ClientSession() as session:
            async with session.post(envoy.url + "/v1/chat/completions", json={}) as response:
                assert response.status == 503  # status_on_error, failure_mode_allow: false
            [line] = await asyncio.to_thread(envoy.access_log, at_least=1)
        assert envoy.running is False
        assert (line["code"], line["flags"]) == (503, "UAEX")
        assert fake.records == []  # fail closed: the model was never called
    finally:
        await fake.stop()


# ----------------------------------------------------------------- (b) through Envoy


def test_openai_completion_through_envoy(
    envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz
) -> None:
    seen = len(envoy.access_log())
    with _openai(envoy.url) as client:
        reply = client.chat.completions.create(
            model="gpt-test",
            messages=CHAT,
            extra_headers={"x-fake-words": "3", "x-authz-forged": "1", "x-not-for-authz": "1"},
        )
    [record] = fake_llm.wait_records(1)
    assert reply.usage is not None and reply.usage.completion_tokens == record.output_tokens == 3
    assert record.headers["x-authz-subject"] == "harness"  # added by Check, seen upstream

    [check] = stub.checks
    http = check.attributes.request.http
    assert b'"model":"gpt-test"' in http.raw_body.replace(b" ", b"")  # pack_as_bytes
    assert "x-authz-forged" in http.headers and "authorization" in http.headers
    assert "x-not-for-authz" not in http.headers  # allowed_headers filters the rest

    stream = _only_stream_closed(stub)
    assert stream.kinds[:2] == ["request_body", "response_headers"]
    assert stream.end_of_stream and stream.response_code == 200
    # forwarding_namespaces hands ext_proc what Check emitted; Envoy adds its own
    # ext_authz_duration (ms) to that namespace.
    assert stream.authz_metadata is not None
    assert stream.authz_metadata["reservation"] == "r-1"
    assert "ext_authz_duration" in stream.authz_metadata

    [line] = envoy.access_log(at_least=seen + 1)[seen:]
    assert line["code"] == 200 and line["path"] == "/v1/chat/completions"
    assert int(line["authz_us"]) > 0  # FILTER_STATE renders as a string, e.g. "5766"
    # Named keys only (the namespace also holds the reservation handle and its MAC).
    assert line["authz"]["subject"] == "harness" and "r-1" not in str(line)
    assert line["usage"] == {"body_bytes": len(stream.response_body)}  # receiving_namespaces


def test_openai_stream_through_envoy(
    envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz
) -> None:
    seen = len(envoy.access_log())
    # Read to the end of the body: the SDK's plain loop closes at [DONE], which races
    # Envoy's end_of_stream to ext_proc (a busy machine lost it: "end=eof"). What this
    # test checks is Envoy's STREAMED delivery of the whole body; how the service
    # settles a stream closed at [DONE] is tests/unit/test_settle_extproc.py's.
    with (
        _openai(envoy.url) as client,
        client.chat.completions.with_streaming_response.create(
            model="gpt-test",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            # Spaced out: a burst arriving in one read reaches ext_proc as ONE body message.
            extra_headers={"x-fake-words": "12", "x-fake-chunk-delay-ms": "5"},
        ) as response,
    ):
        raw = b"".join(response.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    [record] = fake_llm.wait_records(1)
    usage = json.loads(events[-1][len(b"data: ") :])["usage"]
    assert usage["completion_tokens"] == record.output_tokens == 12
    assert record.completed and record.usage_reported and raw.rstrip().endswith(b"data: [DONE]")

    ext_proc = _only_stream_closed(stub)
    assert ext_proc.end_of_stream and b"data: [DONE]" in ext_proc.response_body
    assert ext_proc.kinds.count("response_body") >= 2  # STREAMED: chunk by chunk
    [line] = envoy.access_log(at_least=seen + 1)[seen:]
    assert line["code"] == 200 and int(line["authz_us"]) > 0


def test_anthropic_stream_through_envoy(
    envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz
) -> None:
    with (
        _anthropic(envoy.url) as client,
        client.messages.stream(
            model="claude-test", max_tokens=50, messages=CHAT, extra_headers={"x-fake-words": "8"}
        ) as stream,
    ):
        final = stream.get_final_message()
    [record] = fake_llm.wait_records(1)
    assert final.usage.output_tokens == record.output_tokens == 8
    assert _only_stream_closed(stub).end_of_stream


def test_client_disconnect_through_envoy_closes_ext_proc_without_end_of_stream(
    envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz
) -> None:
    slow = {"x-fake-words": "200", "x-fake-chunk-delay-ms": "10"}
    body = {"model": "m", "messages": CHAT, "stream": True}
    with (
        httpx.Client() as client,
        client.stream("POST", envoy.url + "/v1/chat/completions", json=body, headers=slow) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        next(lines)
    [record] = fake_llm.wait_records(1)
    assert not record.completed
    ext_proc = _only_stream_closed(stub)
    assert not ext_proc.end_of_stream
    # ext_proc_graceful_grpc_close: a half-close the server sees as end of input.
    assert ext_proc.end == "eof"


def test_request_body_over_1mib_through_envoy(
    envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz
) -> None:
    """Guards per_connection_buffer_limit_bytes: at Envoy's 1 MiB default such bodies
    sometimes stalled, and ext_authz then marked truncated bodies as not partial."""
    prompt = "x" * 2_000_000
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.post(envoy.url + "/v1/chat/completions", json=body).status_code == 200
    records = fake_llm.wait_records(3)
    assert all(r.body["messages"][0]["content"] == prompt for r in records)
    for check in stub.checks:
        http = check.attributes.request.http
        assert len(http.raw_body) == 1_048_576  # with_request_body.max_request_bytes
        assert http.headers["x-envoy-auth-partial-body"] == "true"


def test_buffered_json_response_over_1mib_through_envoy(
    envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz
) -> None:
    """The service switches JSON responses to BUFFERED; at the 1 MiB default buffer limit
    a bigger response hung until the client gave up."""
    stub.buffer_responses = True
    body = {"model": "m", "messages": CHAT}
    with httpx.Client(timeout=10) as client:
        reply = client.post(
            envoy.url + "/v1/chat/completions", json=body, headers={"x-fake-words": "400000"}
        )
    assert reply.status_code == 200 and len(reply.content) > 2_000_000
    ext_proc = _only_stream_closed(stub)
    assert ext_proc.kinds.count("response_body") == 1  # the whole body in one message
    assert ext_proc.end_of_stream and len(ext_proc.response_body) == len(reply.content)


def test_envoy_stats(envoy: EnvoyProcess, fake_llm: FakeLLMThread, stub: StubAuthz) -> None:
    with _openai(envoy.url) as client:
        client.chat.completions.create(model="m", messages=CHAT)
    stats = envoy.stats("cluster.authz.")
    assert stats["cluster.authz.upstream_rq_total"] >= 2  # a Check and a Process stream
    assert all(name.startswith("cluster.authz.") for name in stats)
    assert envoy.stats("http.llm.ext_authz.")["http.llm.ext_authz.ok"] >= 1
