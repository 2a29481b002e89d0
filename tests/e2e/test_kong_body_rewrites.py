"""What ext_proc does to bodies, done for Kong: the unchanged plugin in a real nginx
with the Lua module (tests/support/kong_nginx.py), the real service, the fake upstream
and the real openai SDK.

- A request admitted with its output lowered to what a hard budget has left
  (``over_reserve: cap``) reaches the upstream with that limit in its body, so the
  model stops there and the budget is never exceeded, not even by a burst.
- A streamed OpenAI chat request is sent with ``stream_options.include_usage`` and
  settled from the usage the upstream reported, while the client gets the stream it
  asked for: no usage-only chunk (``choices: []``), no ``"usage": null``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.spine_env import metric, wait_metric
from tests.support.clients import closing
from tests.support.fake_llm import FakeLLMThread
from tests.support.kong_nginx import KongNginx
from tests.support.procs import wait_until
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e

BUDGET = 1000
USERS = ("ann", "bob", "cid", "dee")
KEYS = {user: f"sk-kong-{user}" for user in USERS}
_KEY_LINES = "".join(
    f"    - {{name: {u}, sha256: {hashlib.sha256(k.encode()).hexdigest()},"
    f" claims: {{org_id: org{u}, sub: {u}}}}}\n"
    for u, k in KEYS.items()
)
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
{_KEY_LINES}subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: {BUDGET}, period: day, min_output_tokens: 10}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 1000}}]
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz")
    (workdir / "policy.yaml").write_text(POLICY)
    with AuthzService(workdir / "policy.yaml", workdir=workdir) as svc:
        yield svc


@pytest.fixture(scope="module")
def kong(
    tmp_path_factory: pytest.TempPathFactory, service: AuthzService, fake_llm_server: FakeLLMThread
) -> Iterator[KongNginx]:
    gw = KongNginx(tmp_path_factory.mktemp("kong"), upstream_port=fake_llm_server.port,
                   config={"service_url": service.check_http_url})  # fmt: skip
    with gw:
        yield gw


def _client(kong: KongNginx, user: str) -> openai.OpenAI:
    return closing(openai.OpenAI(base_url=kong.url + "/v1", api_key=KEYS[user], max_retries=0,
                                 timeout=30))  # fmt: skip


def _spent(service: AuthzService, user: str) -> float:
    """What the ledger charged the user's org so far (input and output, weights 1)."""
    org = f"org{user}"
    return sum(metric(service.http_url, "authz_tokens_total", org=org, kind=k)
               for k in ("input", "output"))  # fmt: skip


def _settled(service: AuthzService, n: float) -> None:
    wait_until(lambda: metric(service.http_url, "authz_settlements_total") >= n, timeout=30,
               what=f"{n} settlements")  # fmt: skip


def test_a_capped_request_reaches_the_upstream_with_the_lowered_limit(
    kong: KongNginx, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    client = _client(kong, "ann")
    done = metric(service.http_url, "authz_settlements_total")
    fake = {"x-fake-prompt-tokens": "1"}
    client.chat.completions.create(model="gpt-4o", max_tokens=600, messages=HI,  # type: ignore[arg-type]
                                   extra_headers={**fake, "x-fake-words": "600"})  # fmt: skip
    _settled(service, done + 1)
    assert _spent(service, "ann") == 601
    # 399 left; the client asks for 900 and the model would write 900.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=900, messages=HI,  # type: ignore[arg-type]
        extra_headers={**fake, "x-fake-words": "900"},
    )  # fmt: skip
    cap = int(raw.headers["x-authz-max-tokens"])
    assert 300 < cap < 399
    answer = raw.parse()
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == cap
    sent = fake_llm.wait_records(2)[-1].body
    assert sent["max_tokens"] == cap and sent["messages"] == HI and sent["model"] == "gpt-4o"
    _settled(service, done + 2)
    assert _spent(service, "ann") == 601 + 1 + cap <= BUDGET


def test_a_burst_never_spends_past_the_hard_budget(
    kong: KongNginx, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    done = metric(service.http_url, "authz_settlements_total")
    body = {"model": "gpt-4o", "max_tokens": 400, "messages": HI}
    headers = {"authorization": f"Bearer {KEYS['bob']}", "x-fake-words": "400",
               "x-fake-prompt-tokens": "1"}  # fmt: skip

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=30) as http:
            return http.post(kong.url + "/v1/chat/completions", json=body, headers=headers)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    ok = [a for a in answers if a.status_code == 200]
    assert {a.status_code for a in answers} <= {200, 429}, [a.text for a in answers]
    capped = [a for a in ok if "x-authz-max-tokens" in a.headers]
    assert capped, "a request was admitted with its output lowered"
    for a in capped:
        assert a.json()["usage"]["completion_tokens"] == int(a.headers["x-authz-max-tokens"])
    _settled(service, done + len(ok))
    spent = _spent(service, "bob")
    assert spent == sum(a.json()["usage"]["total_tokens"] for a in ok)
    assert BUDGET - 400 < spent <= BUDGET, spent
    assert len(fake_llm.wait_records(len(ok))) == len(ok)


def test_a_stream_settles_the_upstreams_usage_and_the_client_sees_no_usage_chunk(
    kong: KongNginx, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    client = _client(kong, "cid")
    stream = client.chat.completions.create(
        model="gpt-4o", max_tokens=50, messages=HI, stream=True,  # type: ignore[arg-type]
        extra_headers={"x-fake-words": "17", "x-fake-prompt-tokens": "23",
                       "x-fake-split-bytes": "7"},
    )  # fmt: skip
    words = []
    for chunk in stream:  # the loop everyone writes: an empty choices list breaks it
        assert chunk.usage is None
        words.append(chunk.choices[0].delta.content or "")
    assert len("".join(words).split()) == 17
    rec = fake_llm.wait_records(1)[0]
    assert rec.include_usage and rec.usage_reported, "the upstream was asked for usage"
    assert wait_metric(service.http_url, "authz_tokens_total", 17, org="orgcid",
                       kind="output") == 17  # fmt: skip
    assert metric(service.http_url, "authz_tokens_total", org="orgcid", kind="input") == 23
    assert metric(service.http_url, "authz_settlements_total", outcome="estimated") == 0


def test_the_streamed_bytes_are_what_the_upstream_sends_unasked(
    kong: KongNginx, fake_llm: FakeLLMThread
) -> None:
    # The same answer (same id and timestamp) straight from the upstream, without
    # include_usage, and through Kong, which added it: byte for byte equal.
    body = {"model": "gpt-4o", "max_tokens": 50, "messages": HI, "stream": True}
    same = {
        "x-fake-id": "chatcmpl-same",
        "x-fake-created": "1700000000",
        "x-fake-words": "20",
        "x-fake-split-bytes": "5",
        "accept-encoding": "identity",
    }
    with httpx.Client(timeout=30) as http:
        direct = http.post(f"http://127.0.0.1:{fake_llm.port}/v1/chat/completions",
                           json=body, headers=same)  # fmt: skip
        through = http.post(
            kong.url + "/v1/chat/completions",
            json=body,
            headers={**same, "authorization": f"Bearer {KEYS['dee']}"},
        )
    assert through.status_code == 200, through.text
    assert b'"usage"' not in direct.content
    assert through.content == direct.content
    records = fake_llm.wait_records(2)
    assert [r.include_usage for r in records] == [False, True]
