"""A lying upstream through the real Envoy: a gzip bomb, and absurd usage (issue 9, 3-4).

The fake upstream answers with a gzip body that inflates 1000:1 (``x-fake-gzip-bomb``)
or reports ``prompt_tokens: 10**18`` (``x-fake-prompt-tokens``). Before the fix the bomb
took gigabytes of RSS and held the event loop for seconds, so every Check in that time
got Envoy's 503; the absurd usage exhausted the budget. Now the service's peak RSS
barely moves, other clients' Checks keep passing within Envoy's ext_authz timeout, the
bomb's reservation is charged (never zero), and the absurd usage charges the bound.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from authz.apis import Api
from authz.estimate import estimate_request
from authz.policy.bounds import UsageBounds
from tests.e2e.spine_env import metric, wait_metric
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.service import AuthzService

pytestmark = [pytest.mark.e2e]

KEYS = {"victim": "k-victim", "bystander": "k-bystander"}
USER_BUDGET = 100_000
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
ESTIMATE = estimate_request(Api.OPENAI_CHAT, json.dumps(CHAT).encode()).input_tokens
BOMB_MIB = 256  # ~256 KB on the wire


def _key(name: str) -> str:
    digest = hashlib.sha256(KEYS[name].encode()).hexdigest()
    return f"{{name: {name}, sha256: {digest}, claims: {{org_id: {name}org, sub: {name}}}}}"


POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys: [{_key("victim")}, {_key("bystander")}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: {USER_BUDGET}, period: day}}
models:
  rules:
    - {{match: "gpt-*", max_output_tokens: 50}}
    - {{match: "text-embedding-*", max_output_tokens: 1}}
"""


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


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _post(http: httpx.Client, who: str, **headers: str) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"authorization": f"Bearer {KEYS[who]}", **headers},
    )


def test_gzip_bomb_keeps_rss_bounded_and_checks_flowing(
    gw: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    assert service.pid is not None
    with httpx.Client(base_url=gw.url, timeout=30, trust_env=False) as http:
        assert _post(http, "bystander").status_code == 200  # warm: JWKS-free, ledger open
        peak_before = _status_kib(service.pid, "VmHWM")
        bomb_status: list[int] = []

        def bomb() -> None:
            # Raw bytes: the client must not inflate the bomb itself.
            with httpx.Client(base_url=gw.url, timeout=60, trust_env=False) as own, own.stream(
                "POST", "/v1/chat/completions", json=CHAT,
                headers={"authorization": f"Bearer {KEYS['victim']}",
                         "x-fake-gzip-bomb": str(BOMB_MIB)},
            ) as resp:  # fmt: skip
                for _ in resp.iter_raw():
                    pass
                bomb_status.append(resp.status_code)

        thread = threading.Thread(target=bomb)
        thread.start()
        # Other clients' Checks while the bomb is read: each must pass, none get the
        # 503 Envoy answers when the service misses its ext_authz timeout (1 s).
        statuses = [_post(http, "bystander").status_code for _ in range(15)]
        thread.join(60)
        assert not thread.is_alive() and bomb_status == [200]
        assert statuses == [200] * 15
    peak_growth_mib = (_status_kib(service.pid, "VmHWM") - peak_before) / 1024
    assert peak_growth_mib < 64, f"peak RSS grew {peak_growth_mib:.0f} MiB"
    # Charged the reservation (input estimate + max_tokens), never zero; counted.
    url = service.http_url
    assert wait_metric(url, "authz_settlement_bounds_total", 1, reason="decoded_too_large") == 1
    labels = {"org": "victimorg", "model": "gpt-*"}
    assert wait_metric(url, "authz_tokens_total", 50, kind="output", **labels) == 50
    assert metric(url, "authz_tokens_total", kind="input", **labels) == ESTIMATE


def test_absurd_reported_usage_charges_at_most_the_bound(
    gw: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    url = service.http_url
    before = metric(url, "authz_settlement_bounds_total", reason="usage_above_bound")
    most_in = UsageBounds().limits("gpt-4o", ESTIMATE, 50)[0]
    with httpx.Client(base_url=gw.url, timeout=30, trust_env=False) as http:
        lie = _post(http, "victim", **{"x-fake-prompt-tokens": str(10**18)})
        assert lie.status_code == 200 and lie.json()["usage"]["prompt_tokens"] == 10**18
        labels = {"org": "victimorg", "model": "gpt-*"}
        charged = wait_metric(url, "authz_settlement_bounds_total", before + 1,
                              reason="usage_above_bound")  # fmt: skip
        assert charged == before + 1
        assert metric(url, "authz_tokens_total", kind="input", **labels) <= ESTIMATE + most_in
        # The budget was charged the bound, not 10**18: the same user is still served.
        after = _post(http, "victim")
        assert after.status_code == 200, after.text
        remaining = int(after.headers["x-ratelimit-remaining-tokens"])
        assert remaining >= USER_BUDGET - 2 * (most_in + 55) - ESTIMATE - 50


def test_a_buffered_body_past_grpc_default_size_still_settles(
    gw: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    """Envoy sends a BUFFERED ext_proc body up to its 16 MiB buffer limit in one message;
    gRPC's default 4 MiB receive limit broke that stream and the usage was never settled.
    The server now takes what Envoy sends (bounds.grpc_max_message_bytes), no more."""
    body = {"model": "text-embedding-3-large", "input": ["a"] * 300, "dimensions": 3072}
    with httpx.Client(base_url=gw.url, timeout=30, trust_env=False) as http:
        resp = http.post(
            "/v1/embeddings",
            json=body,
            headers={"authorization": f"Bearer {KEYS['bystander']}",
                     "x-fake-prompt-tokens": "777"},
        )  # fmt: skip
        assert resp.status_code == 200 and len(resp.content) > 5 * 1024 * 1024
    labels = {"org": "bystanderorg", "model": "text-embedding-*"}
    assert wait_metric(service.http_url, "authz_tokens_total", 777, kind="input", **labels) == 777


def test_the_upstream_is_asked_for_an_uncompressed_body(
    gw: EnvoyProcess, fake_llm: FakeLLMThread
) -> None:
    """A br or zstd answer could not be read (only charged its reservation), so the
    shipped envoy.yaml asks the upstream for identity whatever the client accepts."""
    with httpx.Client(base_url=gw.url, timeout=30, trust_env=False) as http:
        resp = _post(http, "bystander", **{"accept-encoding": "br, zstd, gzip"})
        assert resp.status_code == 200
    (record,) = fake_llm.wait_records(1)
    assert record.headers["accept-encoding"] == "identity"
