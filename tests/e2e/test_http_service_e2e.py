"""Envoy's ext_authz ``http_service`` mode, through the real Envoy on the shipped
envoy/envoy-http-service.yaml: real openai SDK, real JWTs from a real JWKS endpoint, the
real service, the fake upstream. Allowed, settled exactly (JSON and SSE), then denied
with a 429 the SDK understands; the handle reaches ext_proc and nobody else.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.e2e.http_service_env import HTTP_SERVICE_YAML, render_http_service
from tests.e2e.spine_env import metric, token, wait_metric
from tests.support.certs import TestCA
from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess, cluster, envoy_binary
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
timezone: UTC
identity:
  jwt:
    issuer: https://idp.test/
    audience: llm-gateway
    algorithms: [RS256]
    jwks_url: {jwks_url}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 600, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
"""
HANDLE = re.compile(r"h1\.[A-Za-z0-9_-]+\.[0-9a-f]+")
Gateway = tuple[EnvoyProcess, AuthzService, FakeLLMThread]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return make_rsa_key("http-service")


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, key: SigningKey, fake_llm_server: FakeLLMThread
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("http-service")
    with JwksServer(key) as jwks:
        (tmp / "policy.yaml").write_text(POLICY.format(jwks_url=jwks.url))
        with AuthzService(tmp / "policy.yaml", workdir=tmp) as svc:
            config = render_http_service(svc, fake_llm_server.port, tmp / "envoy.yaml")
            with EnvoyProcess(config) as envoy:
                yield envoy, svc, fake_llm_server


def _client(envoy: EnvoyProcess, tok: str) -> openai.OpenAI:
    return closing(openai.OpenAI(base_url=envoy.url + "/v1", api_key=tok, max_retries=0,
                                 timeout=20))  # fmt: skip


def _call(c: openai.OpenAI, stream: bool, words: int) -> dict[str, str]:
    """One chat completion through Envoy; the client's response headers."""
    kw = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    extra = {"x-fake-words": str(words), "x-fake-prompt-tokens": "13",
             "x-authz-handle": "h1.forged.00"}  # fmt: skip
    # Read to the end: the SDK stops at [DONE], which could reset the stream before
    # ext_proc sees end_of_stream (the abort path, also exact, but not this test's).
    raw = c.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
        **kw, stream=stream, extra_headers=extra
    )
    with raw as response:
        response.read()
        return dict(response.headers)


def _remaining(headers: dict[str, str]) -> int:
    return int(headers["x-ratelimit-remaining-tokens"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_allowed_settled_exactly_then_denied(
    gateway: Gateway, key: SigningKey, stream: bool
) -> None:
    envoy, svc, fake = gateway
    fake.reset()
    user = "sse-user" if stream else "json-user"
    tok = token(key, user, "acme")
    settled = metric(svc.http_url, "authz_settlements_total", outcome="settled")
    with _client(envoy, tok) as c:
        first = _call(c, stream, words=7)
        assert wait_metric(svc.http_url, "authz_settlements_total", settled + 1,
                           outcome="settled") == settled + 1  # fmt: skip
        # The same request again reserves the same amount: what the ledger holds from
        # the first is exactly what the upstream reported (13 in + 7 out), no estimate.
        second = _call(c, stream, words=7)
        assert _remaining(first) - _remaining(second) == 13 + 7
        [rec1, _] = fake.wait_records(2)
        assert rec1.output_tokens == 7 and (rec1.include_usage or not stream)
        # A big answer uses the budget up: the next request is refused with a 429
        # the SDK reads (OpenAI error body, retry-after, x-should-retry: false).
        assert wait_metric(svc.http_url, "authz_settlements_total", settled + 2,
                           outcome="settled") == settled + 2  # fmt: skip
        _call(c, stream, words=600)
        assert wait_metric(svc.http_url, "authz_settlements_total", settled + 3,
                           outcome="settled") == settled + 3  # fmt: skip
        with pytest.raises(openai.RateLimitError) as denied:
            _call(c, stream, words=7)
    err = denied.value
    assert err.status_code == 429 and err.code == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-authz-reason"] == "budget_exhausted"
    assert len(fake.records) == 3  # the denied request never reached the upstream
    # The handle went to ext_proc only: not upstream (the client's forged one is
    # stripped too), not to the client, and nothing was refused.
    for rec in fake.records:
        assert "x-authz-handle" not in rec.headers
        assert not any(HANDLE.search(v) for v in rec.headers.values())
        assert rec.headers["x-authz-subject"] == f"org:acme/user:{user}"
    for headers in (first, second):
        assert "x-authz-handle" not in headers
        assert not any(HANDLE.search(v) for v in headers.values())
    assert metric(svc.http_url, "authz_settle_refused_total") == 0
    assert metric(svc.http_url, "authz_tokens_total", org="acme", kind="output") >= 14


def test_unauthenticated_is_a_401_with_the_error_body(gateway: Gateway) -> None:
    envoy, _, fake = gateway
    fake.reset()
    with _client(envoy, "not-a-jwt") as c, pytest.raises(openai.AuthenticationError) as denied:
        _call(c, False, words=3)
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    assert fake.records == []


def _uncommented_tls(lines: list[str]) -> dict[str, object]:
    """The transport_socket the authz_http cluster ships commented out."""
    first = lines.index("    # transport_socket:", lines.index("  - name: authz_http"))
    block = []
    for line in lines[first:]:
        if not line.startswith("    #"):
            break
        block.append(line.removeprefix("    # "))
    doc: dict[str, object] = yaml.safe_load("\n".join(block))["transport_socket"]
    return doc


@pytest.mark.parametrize("mtls", [False, True], ids=["plain", "mtls"])
def test_bootstrap_validates(tmp_path: Path, mtls: bool) -> None:
    path = HTTP_SERVICE_YAML
    if mtls:  # the block operators are told to uncomment, with real files
        ca = TestCA()
        ca.write(tmp_path / "ca.crt")
        cert, key = ca.issue("gateway").write(tmp_path, "gateway")
        cfg = yaml.safe_load(path.read_text())
        socket = _uncommented_tls(path.read_text().splitlines())
        tls = socket["typed_config"]["common_tls_context"]  # type: ignore[index]
        tls["tls_certificates"][0]["certificate_chain"]["filename"] = str(cert)
        tls["tls_certificates"][0]["private_key"]["filename"] = str(key)
        tls["validation_context"]["trusted_ca"]["filename"] = str(tmp_path / "ca.crt")
        cluster(cfg, "authz_http")["transport_socket"] = socket
        path = tmp_path / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
