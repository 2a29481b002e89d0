"""Two replicas of the service, one Redis, one Envoy: the budgets are shared.

Envoy's ``authz`` cluster lists both replicas with ROUND_ROBIN, so a request's Check
and its ext_proc stream (the settle) often land on different replicas, as they would
behind any load balancer. Each replica runs the default ledger for a redis:// URL (no
edge leases: every check is one atomic script call), settling the other replica's
reservations through Redis. Leases (?lease=on) are covered by
tests/integration/test_redis_leases.py; through this e2e burst they once admitted 12
against a budget for 10 under load, which is why they are opt-in (docs/capacity.md).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from authz.apis import Api
from authz.clock import FakeClock
from authz.estimate import estimate_request
from authz.ledger import Limit, open_ledger
from authz.ledger.redis.ledger import RedisLedger
from authz.policy.model import Weights
from tests.e2e.spine_env import metric, token
from tests.support.envoy_proc import EnvoyProcess, Mutator, cluster, http_filter
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.ports import free_port
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_ec_key, make_rsa_key

pytestmark = pytest.mark.e2e

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "stream": True}  # fmt: skip
RESERVE = estimate_request(Api.OPENAI_CHAT, json.dumps(BODY).encode()).input_tokens + 50
HARD = 10 * RESERVE
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
  - {{name: twin-day, match: {{org: twin}}, tokens: 1000000, period: day}}
  - {{name: hard-day, match: {{org: hard}}, tokens: {hard}, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
  unknown: deny
ledger:
  # Generous timeouts: this module proves budget exactness across replicas, not how
  # the breaker reacts to a starved 2-core test machine (tests/integration does that).
  breaker: {{journal_path: {journal}, call_timeout_s: 0.5}}
"""


@pytest.fixture(scope="module")
def replica_ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def authz_port(replica_ports: tuple[int, int]) -> int:
    return replica_ports[0]


@pytest.fixture(scope="module")
def envoy_mutate(replica_ports: tuple[int, int]) -> Mutator:
    def both(cfg: dict[str, Any]) -> None:
        authz = cluster(cfg, "authz")
        authz["lb_policy"] = "ROUND_ROBIN"
        http_filter(cfg, "envoy.filters.http.ext_authz")["grpc_service"]["timeout"] = "2s"
        authz["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}}}}
            for port in replica_ports
        ]}]  # fmt: skip

    return both


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("twin-rsa")


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    rsa: SigningKey,
    redis: RedisServer,
    replica_ports: tuple[int, int],
) -> Iterator[list[AuthzService]]:
    with JwksServer(rsa, make_ec_key("twin-ec")) as jwks:
        services = []
        try:
            for i, port in enumerate(replica_ports):
                workdir = tmp_path_factory.mktemp(f"replica{i}")
                policy = workdir / "policy.yaml"
                policy.write_text(POLICY.format(jwks_url=jwks.url, hard=HARD,
                                                journal=workdir / "journal.jsonl"))
                services.append(AuthzService(
                    policy, grpc_port=port, workdir=workdir,
                    extra_args=["--ledger", redis.url],
                ).start())  # fmt: skip
            yield services
        finally:
            for svc in services:
                svc.stop()


@pytest.fixture
def gw(envoy: EnvoyProcess, replicas: list[AuthzService], fake_llm: FakeLLMThread
       ) -> EnvoyProcess:  # fmt: skip
    return envoy


def counter_and_rollup(redis: RedisServer, budget: str, org: str) -> tuple[int, int, int]:
    """(used, reserved + leased, rollup tokens) of an org's day counter, read from Redis."""
    now = time.time()
    start = int(now // 86400 * 86400)
    limit = Limit(f"{budget}|org:{org}|{start}", budget, f"org:{org}", 0, start + 86400, Weights())

    async def read() -> tuple[int, int, int]:
        ledger = open_ledger(f"{redis.url}?lease=off", FakeClock(now))
        assert isinstance(ledger, RedisLedger)
        try:
            _, used, reserved, leased = (int(x or 0) for x in await ledger.counter(limit))
            rows = await ledger.rollups(f"org:{org}", "day", start, start + 86400)
        finally:
            await ledger.close()
        tokens = sum(r.input_tokens + r.cached_input_tokens + r.output_tokens for r in rows)
        return used, reserved + leased, tokens

    return asyncio.run(read())


def test_concurrent_checks_on_two_replicas_never_exceed_a_hard_budget(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer
) -> None:
    # Slow streams keep every admitted reservation open while the other checks arrive.
    # Closed even when a request fails: its pooled sockets would otherwise be found by
    # the GC in some later test, as a ResourceWarning that fails that test.
    http = openai.DefaultHttpxClient()
    # Streams of ~3 s: every check of the burst happens while all admitted ones are open
    # (a settlement would free budget and let a later check in, legitimately).
    headers = {"x-fake-chunk-delay-ms": "1000", "x-fake-words": "3"}
    clients = [
        openai.OpenAI(base_url=gw.url + "/v1", api_key=token(rsa, f"h{i}", "hard"),
                      max_retries=0, default_headers=headers, timeout=20, http_client=http)
        for i in range(40)
    ]  # fmt: skip
    start = threading.Barrier(len(clients))

    def one(client: openai.OpenAI) -> tuple[int, float, float]:
        start.wait()
        try:
            stream = client.chat.completions.create(**BODY)  # type: ignore[call-overload]
            admitted = time.monotonic()  # headers are in: the check said yes
            for _ in stream:
                pass
            return 200, admitted, time.monotonic()
        except openai.APIStatusError as exc:
            return exc.status_code, 0.0, 0.0

    with http, ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(one, clients))
    codes = [code for code, _, _ in results]
    ok = [(admitted, ended) for code, admitted, ended in results if code == 200]
    assert set(codes) == {200, 429}, codes
    # While every admitted reservation was still open (before the first stream ended and
    # settled, freeing what it did not use) no more than the budget was admitted...
    first_end = min(ended for _, ended in ok)
    while_all_open = [a for a, _ in ok if a < first_end]
    assert len(while_all_open) <= HARD // RESERVE == 10, results
    assert len(ok) >= 10, results  # the whole budget was usable
    # ... and a check admitted later used budget a settlement gave back (a loaded machine
    # can stretch the burst past the 3 s streams): never more than that.
    assert len(ok) <= 10 + sum(1 for _, e in ok if e < max(a for a, _ in ok)), results
    _, held, _ = counter_and_rollup(redis, "hard-day", "hard")
    assert held <= HARD


def test_totals_in_redis_equal_the_usage_upstream_reported(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, replicas: list[AuthzService],
    fake_llm: FakeLLMThread,
) -> None:  # fmt: skip
    rng = random.Random(3)
    plan = [(f"u{i % 7}", rng.randrange(5, 400), rng.randrange(1, 30), i % 3 == 0)
            for i in range(60)]  # fmt: skip

    def one(item: tuple[str, int, int, bool]) -> None:
        user, prompt, words, stream = item
        # Retries: a request a starved machine times out at the check never reaches the
        # model, so it changes no total; what counts is that every answer is accounted.
        client = openai.OpenAI(
            base_url=gw.url + "/v1", api_key=token(rsa, user, "twin"), max_retries=3, timeout=20,
            default_headers={"x-fake-prompt-tokens": str(prompt), "x-fake-words": str(words)},
        )  # fmt: skip
        out = client.chat.completions.create(**{**BODY, "stream": stream})  # type: ignore[call-overload]
        if stream:
            for _ in out:
                pass
        client.close()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, plan))
    records = fake_llm.wait_records(len(plan))
    reported = sum(r.prompt_tokens + r.output_tokens for r in records)
    assert reported == sum(p + w for _, p, w, _ in plan)
    deadline = time.monotonic() + 10
    while True:  # settlements are asynchronous and flushed in batches
        used, _, rolled = counter_and_rollup(redis, "twin-day", "twin")
        if (used == reported and rolled == reported) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert used == reported and rolled == reported
    for svc in replicas:  # round robin: both replicas decided checks
        assert metric(svc.http_url, "authz_decisions_total", verdict="allow") > 0


def test_replicas_leave_nothing_reserved_on_shutdown(
    gw: EnvoyProcess, redis: RedisServer, replicas: list[AuthzService]
) -> None:
    for svc in replicas:
        assert svc.stop() == 0, svc.stderr_tail()
    used, held, _ = counter_and_rollup(redis, "twin-day", "twin")
    assert held == 0 and used > 0
