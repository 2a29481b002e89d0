"""Prices as providers bill, through the real Envoy, the real SDKs and Redis (issue 16).

The fake upstream reports what providers report: OpenAI ``prompt_tokens_details.
cached_tokens`` and ``service_tier``, Anthropic ``cache_creation_input_tokens`` and
``cache_read_input_tokens``. The cost budget's counter must hold exactly what the
prices table says those cost (micro-dollars), the token budget's the raw tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.e2e.redis_env import (  # noqa: F401  (fixtures, found by name)
    day_counter,
    gw_fixture,
    redis_fixture,
    redis_service,
)
from tests.e2e.spine_env import token
from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e

ORG = "prices"
POLICY = """
version: 1
timezone: UTC
identity:
  jwt: {{issuer: https://idp.test/, audience: llm-gateway, algorithms: [RS256],
        jwks_url: {jwks_url}, leeway_s: 5}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: spend, match: {{user: "*"}}, cost: 100, period: day}}
  - {{name: tokens, match: {{user: "*"}}, tokens: 1000000, period: day}}
models:
  rules: [{{match: "*", max_output_tokens: 50}}]
prices:
  models:
    - {{match: "gpt-*", input: 2, cached_input: 0.5, output: 8,
       service_tiers: {{priority: 2}}}}
    - {{match: "claude-*", input: 3, cached_input: 0.3, cache_write: 3.75, output: 15,
       tiers: [{{above_input_tokens: 200000, input: 6, cached_input: 0.6, cache_write: 7.5,
                 output: 22.5}}]}}
"""


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("prices-rsa")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, rsa: SigningKey, redis: RedisServer, authz_port: int
) -> Iterator[AuthzService]:
    with redis_service(tmp_path_factory, "prices", POLICY, rsa, redis, authz_port) as svc:
        yield svc


def used(redis: RedisServer, budget: str, user: str) -> tuple[int, int] | None:
    return day_counter(redis, ORG, budget, user)


def settled_to(redis: RedisServer, user: str, cost: int, tokens: int) -> None:
    want = {"spend": (cost, 0), "tokens": (tokens, 0)}
    wait_until(lambda: {b: used(redis, b, user) for b in want} == want, timeout=20,
               what=f"{user} counters {want}, now "
                    f"{ {b: used(redis, b, user) for b in want} }")  # fmt: skip


def test_openai_cached_tokens_at_the_cached_price(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, fake_llm: FakeLLMThread
) -> None:
    user = "cached"
    c = closing(openai.OpenAI(base_url=gw.url + "/v1", api_key=token(rsa, user, ORG),
                              max_retries=0, timeout=30))  # fmt: skip
    r = c.chat.completions.create(
        model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-prompt-tokens": "1000", "x-fake-cached-tokens": "800",
                       "x-fake-words": "7"},
    )  # fmt: skip
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 800
    # 200 full-price input * 2 + 800 cached * 0.5 + 7 output * 8
    settled_to(redis, user, cost=200 * 2 + 800 // 2 + 7 * 8, tokens=1007)


def test_openai_priority_tier_as_reported(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, fake_llm: FakeLLMThread
) -> None:
    user = "priority"
    c = closing(openai.OpenAI(base_url=gw.url + "/v1", api_key=token(rsa, user, ORG),
                              max_retries=0, timeout=30))  # fmt: skip
    r = c.chat.completions.create(
        model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-prompt-tokens": "100", "x-fake-words": "5",
                       "x-fake-service-tier": "priority"},
    )  # fmt: skip
    assert r.service_tier == "priority"
    settled_to(redis, user, cost=2 * (100 * 2 + 5 * 8), tokens=105)


def test_anthropic_cache_writes_and_reads_priced_apart(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, fake_llm: FakeLLMThread
) -> None:
    user = "cachewrite"
    c = closing(anthropic.Anthropic(base_url=gw.url, auth_token=token(rsa, user, ORG),
                                    max_retries=0, timeout=30))  # fmt: skip
    m = c.messages.create(
        model="claude-sonnet-4", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-prompt-tokens": "3000", "x-fake-cached-tokens": "2000",
                       "x-fake-cache-creation-tokens": "400", "x-fake-words": "6"},
    )  # fmt: skip
    assert m.usage.cache_creation_input_tokens == 400
    # 600 input * 3 + 400 written * 3.75 + 2000 read * 0.3 + 6 output * 15
    settled_to(redis, user, cost=1800 + 1500 + 600 + 90, tokens=3006)
