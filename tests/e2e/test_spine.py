"""The spine through the real Envoy: real SDKs, real JWTs from a real JWKS endpoint,
the real service as a subprocess, and a fake upstream that speaks the wire formats."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from authz.apis import Api
from authz.estimate import estimate_request
from tests.e2e.spine_env import metric, token, wait_metric, write_policy
from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_ec_key, make_rsa_key

pytestmark = pytest.mark.e2e

BURST_BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 50,
    "stream": True,
}
CHAT_RESERVE = (
    estimate_request(
        Api.OPENAI_CHAT, json.dumps({**BURST_BODY, "stream": False}).encode()
    ).input_tokens
    + 50
)
BURST_RESERVE = estimate_request(Api.OPENAI_CHAT, json.dumps(BURST_BODY).encode()).input_tokens + 50


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("e2e-rsa")


@pytest.fixture(scope="module")
def jwks(rsa: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(rsa, make_ec_key("e2e-ec")) as server:
        yield server


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, jwks: JwksServer, authz_port: int
) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz")
    policy = write_policy(workdir / "policy.yaml", jwks.url, burst_tokens=10 * BURST_RESERVE)
    with AuthzService(policy, grpc_port=authz_port, workdir=workdir) as svc:
        yield svc


@pytest.fixture
def gw(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    return envoy


def oai(envoy: EnvoyProcess, tok: str, **headers: str) -> openai.OpenAI:
    return closing(
        openai.OpenAI(
            base_url=envoy.url + "/v1",
            api_key=tok,
            max_retries=0,
            default_headers=headers or None,
            timeout=20,
        )
    )


def chat(client: openai.OpenAI, **kw: object) -> object:
    return client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50, **kw
    )  # type: ignore[call-overload]


def test_allowed_until_user_budget_spent_then_rate_limit_error(
    gw: EnvoyProcess, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    client = oai(gw, token(rsa, "alice", "acme"), **{"x-fake-prompt-tokens": "100"})
    allowed = 0
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(20):
            resp = chat(client)
            assert resp.usage.total_tokens == 105  # type: ignore[attr-defined]
            allowed += 1
    # 1000 tokens; 105 settled per request; a check needs the estimate + 50 free.
    need, left, expected = CHAT_RESERVE, 1000, 0
    while left >= need:
        left, expected = left - 105, expected + 1
    assert allowed == expected
    body = err.value.body
    assert isinstance(body, dict)
    assert body["type"] == "insufficient_quota" and body["code"] == "insufficient_quota"
    assert "user-daily" in body["message"] and "user:alice" in body["message"]
    headers = err.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"]) == max(0, left)
    assert 0 < int(headers["retry-after"]) <= 86400
    assert headers["x-should-retry"] == "false"
    fake_llm.wait_records(expected)
    assert len(fake_llm.records) == expected  # the denied request never reached the model


def test_allowed_response_carries_quota_headers(gw: EnvoyProcess, rsa: SigningKey) -> None:
    client = oai(gw, token(rsa, "hdr-user", "acme"))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    assert 900 < int(raw.headers["x-ratelimit-remaining-tokens"]) < 1000
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_org_budget_blocks_user_whose_own_budget_has_room(
    gw: EnvoyProcess, rsa: SigningKey
) -> None:
    spender = oai(gw, token(rsa, "spender", "small"), **{"x-fake-prompt-tokens": "200"})
    chat(spender)
    chat(spender)  # org-small: 300 -> 95 left -> one more check fits, settles 205
    other = oai(gw, token(rsa, "newcomer", "small"))
    with pytest.raises(openai.RateLimitError) as err:
        chat(other)
    assert "org-small" in err.value.body["message"]  # type: ignore[index]


def test_stream_settles_exact_reported_usage(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    client = oai(
        gw,
        token(rsa, "streamer", "streamorg"),
        **{"x-fake-prompt-tokens": "37", "x-fake-words": "12", "x-fake-cached-tokens": "7"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True) if c.choices)  # type: ignore[attr-defined]
    assert len(text.split()) == 12
    rec = fake_llm.wait_records(1)[0]
    assert rec.include_usage, "the service should have asked upstream for the usage chunk"
    labels = {"org": "streamorg", "model": "gpt-*"}
    assert wait_metric(service.http_url, "authz_tokens_total", 12, kind="output", **labels) == 12
    assert metric(service.http_url, "authz_tokens_total", kind="input", **labels) == 30
    assert metric(service.http_url, "authz_tokens_total", kind="cached_input", **labels) == 7


def test_anthropic_sdk_json_and_stream_then_rate_limit(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService
) -> None:
    client = closing(
        anthropic.Anthropic(
            base_url=gw.url,
            api_key=token(rsa, "claude-user", "anthro"),
            max_retries=0,
            timeout=20,
            default_headers={"x-fake-prompt-tokens": "300", "x-fake-words": "8"},
        )
    )
    msg = client.messages.create(
        model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.usage.output_tokens == 8
    with client.messages.stream(
        model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert len(stream.get_final_text().split()) == 8
    labels = {"org": "anthro", "model": "claude-*"}
    assert wait_metric(service.http_url, "authz_tokens_total", 16, kind="output", **labels) == 16
    assert metric(service.http_url, "authz_tokens_total", kind="input", **labels) == 600
    # 1000 - 616 = 384 left: two more fit, then the user budget is gone
    with pytest.raises(anthropic.RateLimitError) as err:
        for _ in range(5):
            client.messages.create(
                model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )
    assert err.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_client_disconnect_mid_stream_charges_what_was_received(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    client = oai(
        gw,
        token(rsa, "leaver", "leaveorg"),
        **{"x-fake-words": "40", "x-fake-chunk-delay-ms": "50", "x-fake-prompt-tokens": "20"},
    )
    stream = chat(client, stream=True)
    seen = 0
    for chunk in stream:  # type: ignore[attr-defined]
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
        if seen == 5:
            break
    stream.close()  # type: ignore[attr-defined]
    labels = {"org": "leaveorg", "model": "gpt-*"}
    out = wait_metric(service.http_url, "authz_tokens_total", 1, kind="output", **labels)
    inp = metric(service.http_url, "authz_tokens_total", kind="input", **labels)
    rec = fake_llm.wait_records(1, timeout=10)[0]
    assert not rec.completed
    assert inp > 0, "input is charged from the estimate"
    assert 1 <= out < 40, f"output charged from streamed text, not the reservation: {out}"
    assert wait_metric(service.http_url, "authz_settlements_total", 1, outcome="aborted") >= 1


def test_fifty_concurrent_requests_budget_for_ten_admit_ten(
    gw: EnvoyProcess, rsa: SigningKey
) -> None:
    # Each request is a different user, so only the org budget (10 reservations) binds;
    # the slow stream keeps every reservation open while the other checks arrive.
    # Clients are built first and share one connection pool: building 50 SDK clients
    # (TLS contexts and all) inside the burst would starve the 2-core machine's service
    # of CPU and measure the test's client, not the gateway.
    # Closed even when a request fails: its pooled sockets would otherwise be found by
    # the GC in some later test, as a ResourceWarning that fails that test.
    http = openai.DefaultHttpxClient()
    # ~3 s streams: no admitted request settles (freeing budget) before the burst is decided.
    headers = {"x-fake-chunk-delay-ms": "1000", "x-fake-words": "3"}
    clients = [
        openai.OpenAI(base_url=gw.url + "/v1", api_key=token(rsa, f"burst-{i}", "burst"),
                      max_retries=0, default_headers=headers, timeout=20, http_client=http)
        for i in range(50)
    ]  # fmt: skip
    start = threading.Barrier(50)

    def one(client: openai.OpenAI) -> int:
        start.wait()
        try:
            for _ in client.chat.completions.create(**BURST_BODY):  # type: ignore[call-overload]
                pass
            return 200
        except openai.RateLimitError:
            return 429

    with http, ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, clients))
    assert codes.count(200) == 10 and codes.count(429) == 40


def test_security_denials_through_envoy(gw: EnvoyProcess, rsa: SigningKey) -> None:
    expired = token(rsa, "late", "acme", exp=int(time.time()) - 3600)
    for bad in (expired, "garbage", "a.b.c"):
        with pytest.raises(openai.AuthenticationError) as err:
            chat(oai(gw, bad))
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        assert bad not in json.dumps(err.value.body)


def test_client_sent_authz_headers_are_stripped(
    gw: EnvoyProcess, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    client = oai(
        gw,
        token(rsa, "honest", "acme"),
        **{"x-authz-subject": "org:evil/user:root", "x-authz-admin": "yes"},
    )
    chat(client)
    rec = fake_llm.wait_records(1)[0]
    assert rec.headers["x-authz-subject"] == "org:acme/user:honest"
    assert "x-authz-admin" not in rec.headers
    # The reservation handle stays between Envoy and the service (authz/handles.py).
    assert not any(k.startswith("x-authz-") for k in rec.headers if k != "x-authz-subject")


def test_upstream_error_releases_reservation(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService
) -> None:
    client = oai(gw, token(rsa, "unlucky", "errorg"), **{"x-fake-status": "500"})
    before = metric(service.http_url, "authz_settlements_total", outcome="released")
    for _ in range(12):  # 12 x 55 would overflow the 1000 user budget if not released
        with pytest.raises(openai.InternalServerError):
            chat(client)
    assert (
        wait_metric(service.http_url, "authz_settlements_total", before + 12, outcome="released")
        == before + 12
    )
    chat(oai(gw, token(rsa, "unlucky", "errorg")))


def test_graceful_stop(tmp_path: Path, jwks: JwksServer) -> None:
    import signal

    policy = write_policy(tmp_path / "p.yaml", jwks.url, burst_tokens=100)
    svc = AuthzService(policy, workdir=tmp_path).start()
    svc.send_signal(signal.SIGTERM)
    assert svc.wait(15) == 0
    assert '"stopped"' in svc.stderr_path.read_text()


def test_gzip_responses_settle_exact_usage(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    client = oai(
        gw,
        token(rsa, "zipper", "ziporg"),
        # "always": the shipped Envoy asks the upstream for identity; this one gzips anyway.
        **{"x-fake-gzip": "always", "x-fake-words": "6", "x-fake-prompt-tokens": "11"},
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )
    assert raw.headers.get("content-encoding") == "gzip"
    assert raw.parse().usage.completion_tokens == 6  # type: ignore[union-attr]
    text = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True) if c.choices)  # type: ignore[attr-defined]
    assert len(text.split()) == 6
    labels = {"org": "ziporg", "model": "gpt-*"}
    assert wait_metric(service.http_url, "authz_tokens_total", 12, kind="output", **labels) == 12
    assert metric(service.http_url, "authz_tokens_total", kind="input", **labels) == 22


@pytest.mark.parametrize("body", [b"not json", b'{"model": "gpt-4o", "messages": [', b""])
def test_unreadable_body_gets_clean_400(gw: EnvoyProcess, rsa: SigningKey, body: bytes) -> None:
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        content=body,
        timeout=10,
        headers={
            "authorization": f"Bearer {token(rsa, 'sloppy', 'acme')}",
            "content-type": "application/json",
        },
    )
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert (
        err["type"] == "invalid_request_error" and err["code"] == "bad_request" and err["message"]
    )


def test_oversized_body_is_not_trusted_as_complete(gw: EnvoyProcess, rsa: SigningKey) -> None:
    # Envoy forwards at most 1 MiB of the body to the Check: a partial body cannot be
    # estimated, so the policy's bad_body rule (deny) applies.
    big = json.dumps(
        {
            "model": "gpt-4o",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}],
        }
    )
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        content=big,
        timeout=20,
        headers={
            "authorization": f"Bearer {token(rsa, 'bulky', 'acme')}",
            "content-type": "application/json",
        },
    )
    assert resp.status_code == 400
    assert "larger than the gateway forwards" in resp.json()["error"]["message"]


def test_anthropic_denials_use_anthropic_error_format(gw: EnvoyProcess) -> None:
    client = closing(
        anthropic.Anthropic(base_url=gw.url, api_key="not-a-token", max_retries=0, timeout=10)
    )
    with pytest.raises(anthropic.AuthenticationError) as err:
        client.messages.create(
            model="claude-sonnet-4", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.body["type"] == "error"  # type: ignore[index]
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
