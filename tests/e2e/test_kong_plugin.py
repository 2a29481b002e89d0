"""The Kong plugin, unchanged, in a real nginx with the Lua module (through the PDK
stand-in in tests/support/kong_stub/), against the real service's HTTP check and settle
API, the fake LLM upstream, real JWTs and the real openai SDK: allow, deny, an SSE
stream, a client that leaves, and the service down (fail closed, fail open)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from authz.apis import Api
from authz.estimate import estimate_request
from tests.e2e.spine_env import metric, token, wait_metric, write_policy
from tests.support.certs import TestCA
from tests.support.clients import closing
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.kong_nginx import KongNginx
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("kong-rsa")


@pytest.fixture(scope="module")
def jwks(rsa: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(rsa) as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, jwks: JwksServer) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz")
    policy = write_policy(workdir / "policy.yaml", jwks.url, burst_tokens=100_000)
    with AuthzService(policy, workdir=workdir) as svc:
        yield svc


def start_kong(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeLLMThread, **kw: Any
) -> KongNginx:
    return KongNginx(tmp_path_factory.mktemp("kong"), upstream_port=fake.port, **kw).start()


@pytest.fixture(scope="module")
def kong(
    tmp_path_factory: pytest.TempPathFactory,
    service: AuthzService,
    fake_llm_server: FakeLLMThread,
) -> Iterator[KongNginx]:
    gw = start_kong(tmp_path_factory, fake_llm_server, config={"service_url": service.check_http_url})
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gw(kong: KongNginx, fake_llm: FakeLLMThread) -> KongNginx:
    return kong


def oai(base_url: str, tok: str, **headers: str) -> openai.OpenAI:
    return closing(
        openai.OpenAI(
            base_url=base_url, api_key=tok, max_retries=0, default_headers=headers or None,
            timeout=20,
        )
    )  # fmt: skip


def tokens(service: AuthzService, org: str, kind: str) -> float:
    return metric(service.http_url, "authz_tokens_total", org=org, kind=kind)


def test_allowed_then_denied_then_settled_exactly(
    gw: KongNginx, service: AuthzService, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    client = oai(gw.url + "/v1", token(rsa, "kong-alice", "kongorg"),
                 **{"x-fake-prompt-tokens": "100", "x-authz-handle": "forged.mac"})  # fmt: skip
    first = client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert first.parse().usage.total_tokens == 105
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 1000
    allowed = 1
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(20):
            # Kong settles from the log phase, after the answer: wait for it, so each
            # check sees the ledger the previous request left.
            assert wait_metric(service.http_url, "authz_tokens_total", 5 * allowed,
                               org="kongorg", kind="output") == 5 * allowed  # fmt: skip
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            allowed += 1
    # The ledger holds what the upstream reported, request by request: 105 each.
    assert tokens(service, "kongorg", "input") == 100 * allowed
    # 1000 tokens, 105 settled per request; a check needs its estimate + 50 free.
    need, left, expected = estimate_request(Api.OPENAI_CHAT, json.dumps(CHAT).encode()), 1000, 0
    while left >= need.input_tokens + 50:
        left, expected = left - 105, expected + 1
    assert allowed == expected
    body = err.value.body
    assert isinstance(body, dict)
    assert body["type"] == "insufficient_quota" and body["code"] == "insufficient_quota"
    assert "user-daily" in body["message"]
    assert err.value.response.headers["x-ratelimit-remaining-tokens"] == str(max(0, left))
    assert 0 < int(err.value.response.headers["retry-after"]) <= 86400
    records = fake_llm.wait_records(allowed)
    assert len(records) == allowed  # the denied request never reached the upstream
    for rec in records:
        assert "x-authz-handle" not in rec.headers, "the handle never goes upstream"
        assert "authorization" in rec.headers


def test_stream_passes_unbuffered_and_settles_exactly(
    gw: KongNginx, service: AuthzService, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    client = oai(gw.url + "/v1", token(rsa, "kong-streamer", "kongstream"),
                 **{"x-fake-prompt-tokens": "37", "x-fake-words": "12",
                    "x-fake-hold": "kong-stream"})  # fmt: skip
    stream = client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    chunks = iter(stream)
    words: list[str] = []
    while not words:  # the first word arrives while the upstream holds the rest back
        chunk = next(chunks)
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
    assert fake_llm.records == [], "the upstream is still holding its stream"
    fake_llm.release("kong-stream")
    usage = None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len("".join(words).split()) == 12 and usage is not None
    assert wait_metric(service.http_url, "authz_tokens_total", 12,
                       org="kongstream", kind="output") == 12  # fmt: skip
    assert tokens(service, "kongstream", "input") == 37
    assert fake_llm.wait_records(1)[0].completed


def test_stream_bytes_reach_the_client_unchanged(
    gw: KongNginx, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    # The same answer (same id, same timestamp) straight from the upstream and through
    # Kong, written in small pieces so chunks cut across SSE events: byte for byte equal.
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    same = {"x-fake-id": "chatcmpl-same", "x-fake-created": "1700000000",
            "x-fake-words": "20", "x-fake-split-bytes": "7", "accept-encoding": "identity"}
    auth = {"authorization": "Bearer " + token(rsa, "kong-bytes", "kongbytes")}
    with httpx.Client(timeout=20) as http:
        direct = http.post(f"http://127.0.0.1:{fake_llm.port}/v1/chat/completions",
                           json=body, headers=same)  # fmt: skip
        through = http.post(gw.url + "/v1/chat/completions", json=body, headers=same | auth)
    assert through.status_code == 200, through.text
    assert through.headers["content-type"].startswith("text/event-stream")
    assert through.content == direct.content


def test_client_abort_is_settled_by_the_abort_rule(
    gw: KongNginx, service: AuthzService, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    aborted = metric(service.http_url, "authz_settlements_total", outcome="aborted")
    client = oai(gw.url + "/v1", token(rsa, "kong-leaver", "kongleave"),
                 **{"x-fake-words": "40", "x-fake-chunk-delay-ms": "50",
                    "x-fake-prompt-tokens": "20"})  # fmt: skip
    stream = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
        if seen == 5:
            break
    stream.close()
    assert wait_metric(service.http_url, "authz_settlements_total", aborted + 1,
                       outcome="aborted") == aborted + 1  # fmt: skip
    out = tokens(service, "kongleave", "output")
    assert tokens(service, "kongleave", "input") > 0, "input is charged from the estimate"
    assert 5 <= out < 40, f"output charged from the streamed text, not zero, not all: {out}"
    assert not fake_llm.wait_records(1, timeout=10)[0].completed


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_service_down(
    tmp_path_factory: pytest.TempPathFactory,
    fake_llm: FakeLLMThread,
    rsa: SigningKey,
    fail_open: bool,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = start_kong(tmp_path_factory, fake_llm,
                    config={"service_url": dead, "fail_open": fail_open})  # fmt: skip
    try:
        client = oai(gw.url + "/v1", token(rsa, "kong-down", "kongdown"))
        if fail_open:
            resp = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            assert resp.usage.total_tokens > 0
            rec = fake_llm.wait_records(1)[0]
            assert not [h for h in rec.headers if h.startswith("x-authz-")]
            log = "letting the request through unbudgeted"
        else:
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            assert err.value.status_code == 503
            assert err.value.body["code"] == "budget_service_unavailable"  # type: ignore[index]
            assert fake_llm.records == []
            log = "refusing the request"
        wait_until(lambda: log in gw.error_log_text(), timeout=10, what="the plugin's log line")
    finally:
        gw.stop()


def test_without_kong_queue_a_timer_settles_and_routes_strip_their_prefix(
    tmp_path_factory: pytest.TempPathFactory,
    service: AuthzService,
    fake_llm: FakeLLMThread,
    rsa: SigningKey,
) -> None:
    # Kong before 3.3 has no kong.tools.queue; the route here is /openai, stripped.
    gw = start_kong(tmp_path_factory, fake_llm, queue=False, strip_path="/openai",
                    config={"service_url": service.check_http_url})  # fmt: skip
    try:
        client = oai(gw.url + "/openai/v1", token(rsa, "kong-old", "kongold"),
                     **{"x-fake-prompt-tokens": "11", "x-fake-words": "3"})  # fmt: skip
        assert client.chat.completions.create(**CHAT).usage.total_tokens == 14  # type: ignore[call-overload]
        assert wait_metric(service.http_url, "authz_tokens_total", 3,
                           org="kongold", kind="output") == 3  # fmt: skip
        assert tokens(service, "kongold", "input") == 11
        assert fake_llm.wait_records(1)[0].path == "/v1/chat/completions"
    finally:
        gw.stop()


def test_request_body_spilled_to_disk_still_reaches_the_check(
    gw: KongNginx, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    # nginx keeps 8-16 KiB of a body in memory and writes a bigger one to a file: the
    # plugin reads it from there, so the service sees a prompt far over the 1000-token
    # user budget and refuses it (with no body it would have had nothing to count).
    big = {**CHAT, "messages": [{"role": "user", "content": "word " * 20_000}]}
    auth = {"authorization": "Bearer " + token(rsa, "kong-big", "kongbig")}
    with httpx.Client(timeout=20) as http:
        resp = http.post(gw.url + "/v1/chat/completions", json=big, headers=auth)
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == "insufficient_quota"
    assert fake_llm.records == []


@pytest.mark.hostile
def test_mtls_to_the_service_and_a_stranger_certificate_refused(
    tmp_path_factory: pytest.TempPathFactory,
    jwks: JwksServer,
    fake_llm: FakeLLMThread,
    rsa: SigningKey,
) -> None:
    # The check port takes the gRPC port's mTLS: the plugin presents a gateway
    # certificate from the service's client CA; one from another CA gets no answer,
    # and the plugin fails closed.
    pki = tmp_path_factory.mktemp("pki")
    ca = TestCA("kong-test-ca")
    ca.issue("authz", server=True).write(pki, "server")
    ca_file = ca.write(pki / "ca.crt")
    tls = ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
           "--tls-client-ca", str(ca_file)]  # fmt: skip
    workdir = tmp_path_factory.mktemp("authz-mtls")
    policy = write_policy(workdir / "policy.yaml", jwks.url, burst_tokens=100_000)
    with AuthzService(policy, workdir=workdir, extra_args=tls) as svc:
        https = svc.check_http_url.replace("http://", "https://")
        for who, issued in (("gateway", ca.issue("kong-gateway")),
                            ("stranger", TestCA("mallory-ca").issue("kong-gateway"))):  # fmt: skip
            config = {"service_url": https, "ssl_server_name": "authz",
                      "client_cert": issued.cert_pem.decode(),
                      "client_key": issued.key_pem.decode()}  # fmt: skip
            gw = start_kong(tmp_path_factory, fake_llm, config=config, trusted_ca=ca_file)
            try:
                client = oai(gw.url + "/v1", token(rsa, f"kong-{who}", f"kongtls{who}"),
                             **{"x-fake-prompt-tokens": "13", "x-fake-words": "4"})  # fmt: skip
                if who == "gateway":
                    resp = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
                    assert resp.usage.total_tokens == 17
                    assert wait_metric(svc.http_url, "authz_tokens_total", 4,
                                       org="kongtlsgateway", kind="output") == 4  # fmt: skip
                    assert metric(svc.http_url, "authz_tokens_total",
                                  org="kongtlsgateway", kind="input") == 13  # fmt: skip
                else:
                    with pytest.raises(openai.InternalServerError) as err:
                        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
                    assert err.value.status_code == 503
                    assert len(fake_llm.records) == 1  # only the gateway's request went up
            finally:
                gw.stop()
