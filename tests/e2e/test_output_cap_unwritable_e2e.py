"""A cap that cannot be written never goes upstream uncapped (issue 10, #2), through Envoy.

The shipped config never lets it happen: Check only decides on bodies up to 1 MiB,
and ext_proc rewrites up to 1 MiB. An operator who raises Envoy's ext_authz
``max_request_bytes`` and ``bounds.request_body_bytes`` gets bodies Check caps but
ext_proc will not re-encode: those must be answered 429 by ext_proc, in the
provider's error format, with the reservation released.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.envoy_proc import EnvoyProcess, Mutator, http_filter
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e
BIG = 4 * 1024 * 1024
TEXT = "x" * (1536 * 1024)  # 1.5 MiB: 393,216 input tokens + 4 for the message
AMOUNT = 400_000  # the worst case (393,220 + 4,096 x 4) does not fit; 1,695 output does


@pytest.fixture(scope="module")
def envoy_mutate() -> Mutator:
    def mutate(cfg: dict) -> None:  # type: ignore[type-arg]
        ext_authz = http_filter(cfg, "envoy.filters.http.ext_authz")
        ext_authz["with_request_body"]["max_request_bytes"] = BIG
        # A 1.5 MiB Check on a busy machine can take longer than the shipped 250 ms.
        ext_authz["grpc_service"]["timeout"] = "10s"
        http_filter(cfg, "envoy.filters.http.ext_proc")["message_timeout"] = "10s"

    return mutate


@pytest.fixture
def service(tmp_path: Path, authz_port: int) -> Iterator[AuthzService]:
    digest = hashlib.sha256(b"k-big").hexdigest()
    (tmp_path / "policy.yaml").write_text(f"""
version: 1
identity:
  api_keys: [{{name: big, sha256: {digest}, claims: {{org_id: acme, sub: big}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
weights: {{input: 1, output: 4}}
budgets: [{{name: user-daily, match: {{user: "*"}}, tokens: {AMOUNT}, period: day}}]
models:
  rules: [{{match: "gpt-*", max_output_tokens: 4096}}]
bounds: {{request_body_bytes: {BIG}}}
""")
    with AuthzService(tmp_path / "policy.yaml", grpc_port=authz_port, workdir=tmp_path) as svc:
        yield svc


def test_an_unwritable_cap_is_a_429_and_nothing_goes_upstream(
    envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    with openai.OpenAI(base_url=envoy.url + "/v1", api_key="k-big", max_retries=0,
                       timeout=60) as client:  # fmt: skip
        _refused_then_served(client, fake_llm)


def _refused_then_served(client: openai.OpenAI, fake_llm: FakeLLMThread) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": TEXT}])
    headers = err.value.response.headers
    cap = (AMOUNT - 393_220) // 4
    assert headers["x-authz-max-tokens"] == str(cap) and headers["x-should-retry"] == "false"
    assert err.value.code == "insufficient_quota" and f"at most {cap}" in err.value.message
    # Released at once: a small request sees the whole budget (less its own reservation).
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(AMOUNT - 5 - 40)
    assert "x-authz-max-tokens" not in raw.headers
    # Only the small request's body reached the upstream. (With request headers skipped
    # by ext_proc, Envoy may open the upstream request before the body is processed; the
    # 429 then resets it before a byte of the body is sent: a 499 record, no body.)
    wait_until(lambda: any(r.body for r in fake_llm.records), timeout=10, what="the record")
    bodies = [r.body for r in fake_llm.records if r.body is not None or r.status != 499]
    assert len(bodies) == 1 and bodies[0] is not None and bodies[0]["max_tokens"] == 10
