"""Path aliases through the real Envoy: a spelling is never a way around the budget.

A user spends the whole budget with one plain request. Then every other spelling of
every metered path (escapes, double escapes, dot segments, ``//``, trailing ``/``,
``;params``, case, gateway prefixes, an escaped slash or query) is sent as raw bytes:
each is refused (429 from the budget, or Envoy's 400 for an escaped slash) and none
reaches the upstream. An unlisted GET gets a clear 403 in OpenAI's error format;
``GET /v1/models``, listed by default, passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from authz.apis import Api
from authz.estimate import estimate_request
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.service import AuthzService

pytestmark = [pytest.mark.e2e]

KEY = "k-broke"
CHAT_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
# The budget is exactly one plain request's reservation; the fake reports more usage than
# that, so from the first request on nothing is left (held, then charged).
BUDGET = estimate_request(Api.OPENAI_CHAT, json.dumps(CHAT_BODY).encode()).input_tokens + 50
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: broke, sha256: {hashlib.sha256(KEY.encode()).hexdigest()},
        claims: {{org_id: acme, sub: broke}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: {BUDGET}, period: day}}
models:
  rules:
    - {{match: "gpt-*", max_output_tokens: 50}}
    - {{match: "text-embedding-*", max_output_tokens: 1}}
    - {{match: "claude-*", max_output_tokens: 50}}
"""

EMBED = {"model": "text-embedding-3-small", "input": "hi"}
RESPONSES = {"model": "gpt-4o", "input": "hi", "max_output_tokens": 50}
COMPLETION = {"model": "gpt-4o", "prompt": "hi", "max_tokens": 50}
MESSAGES = {"model": "claude-3-5-haiku", "max_tokens": 50, "messages": CHAT_BODY["messages"]}
ALIASES: list[tuple[str, object]] = [
    ("/v1/chat/%63ompletions", CHAT_BODY),  # Envoy decodes it
    ("/v1/cha%74/completions", CHAT_BODY),
    ("/v1/chat/%2563ompletions", CHAT_BODY),  # double-encoded: Envoy leaves it
    ("/v1/chat/%252563ompletions", CHAT_BODY),
    ("/v1//chat///completions", CHAT_BODY),
    ("/v1/./chat/x/../completions", CHAT_BODY),
    ("/v1/chat/completions/", CHAT_BODY),
    ("/v1/chat/completions;x=1", CHAT_BODY),
    ("/v1/x/..;/chat/completions", CHAT_BODY),
    ("/V1/Chat/COMPLETIONS", CHAT_BODY),
    ("/openai/v1/chat/completions?api-version=2024-10-21", CHAT_BODY),
    ("/v1/chat/completions%3Fx=1", CHAT_BODY),
    ("/v1/chat%2Fcompletions", CHAT_BODY),  # Envoy refuses escaped slashes
    ("/v1/chat\\completions", CHAT_BODY),
    ("/v1/%2565mbeddings", EMBED),
    ("/v1/Embeddings/", EMBED),
    ("/v1/responses;a", RESPONSES),
    ("/v1/completions/.", COMPLETION),
    ("/v1/%6D%65ssages", MESSAGES),
    ("/anthropic/V1/messages;x", MESSAGES),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, authz_port: int) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    with AuthzService(policy, grpc_port=authz_port, workdir=workdir) as svc:
        yield svc


@pytest.fixture
def gw(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    return envoy


def _send(http: httpx.Client, method: str, target: str, body: object | None) -> httpx.Response:
    """Send ``target`` byte for byte: httpx would otherwise resolve dot segments."""
    content = json.dumps(body).encode() if body is not None else None
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    return http.request(
        method, "/", content=content, headers=headers, extensions={"target": target.encode()}
    )


def test_no_alias_reaches_the_upstream_once_the_budget_is_spent(
    gw: EnvoyProcess, fake_llm: FakeLLMThread
) -> None:
    with openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key=KEY,
        max_retries=0,
        timeout=20,
        default_headers={"x-fake-prompt-tokens": "1000"},
    ) as client:
        client.chat.completions.create(**CHAT_BODY)  # type: ignore[call-overload]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**CHAT_BODY)  # type: ignore[call-overload]
    fake_llm.wait_records(1)

    outcomes = {}
    with httpx.Client(base_url=gw.url, timeout=20, trust_env=False) as http:
        for target, body in ALIASES:
            resp = _send(http, "POST", target, body)
            outcomes[target] = resp.status_code
            if resp.status_code == 429:
                assert resp.headers["x-authz-reason"] == "budget_exhausted", target
        # A free request last: once its record lands, any alias served before it has too.
        assert _send(http, "GET", "/v1/models", None).status_code == 200
    fake_llm.wait_records(2)
    assert [r.path for r in fake_llm.records] == ["/v1/chat/completions", "/v1/models"]
    refused = {target: code for target, code in outcomes.items() if code not in (400, 429)}
    assert refused == {}, outcomes
    # Only the escaped slash is Envoy's to refuse; everything else reached the service.
    assert outcomes["/v1/chat%2Fcompletions"] == 400
    assert outcomes["/v1/chat/%2563ompletions"] == 429


def test_unlisted_paths_get_a_clear_403_and_the_models_listing_passes(
    gw: EnvoyProcess, fake_llm: FakeLLMThread
) -> None:
    with httpx.Client(base_url=gw.url, timeout=20, trust_env=False) as http:
        for method, target in [
            ("GET", "/v1/files"),
            ("GET", "/v1/chat/completions"),  # a metered path, but not a POST
            ("POST", "/v1/images/generations"),  # a metered API the service cannot price
            ("GET", "/v1/models;x/../../chat/completions"),
        ]:
            resp = _send(http, method, target, None)
            assert resp.status_code == 403, (method, target, resp.text)
            error = resp.json()["error"]
            assert (error["type"], error["code"]) == ("permission_denied", "path_not_allowed")
            assert "requests.unmetered" in error["message"]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20) as client:
        assert [m.id for m in client.models.list()]
    fake_llm.wait_records(1)
    assert [(r.path, r.status) for r in fake_llm.records] == [("/v1/models", 200)]
