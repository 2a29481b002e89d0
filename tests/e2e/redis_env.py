"""One service on a real redis-server behind the e2e Envoy, as several e2e modules run it.

The confirm, exact-totals, holds-released and prices modules each start a redis-server,
a JWKS endpoint and the service on that Redis with their own policy, and read one user's
day counter straight from Redis to compare the ledger with what the upstream reported.
The fixtures here (``redis``, ``gw``) are imported into those modules, where pytest
finds them;
each module keeps its own ``rsa`` key and ``service`` fixture, built with
:func:`redis_service`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis as redis_py

from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_ec_key

__all__ = ["day_counter", "gw_fixture", "redis_fixture", "redis_service"]


@pytest.fixture(scope="module", name="redis")
def redis_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(name="gw")
def gw_fixture(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    """The Envoy in front of this module's service and the fake upstream."""
    return envoy


@contextmanager
def redis_service(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    policy: str,
    rsa: SigningKey,
    redis: RedisServer,
    authz_port: int,
    query: str = "?lease=off",
) -> Iterator[AuthzService]:
    """The service on ``redis`` with ``policy``, a template that may use ``{jwks_url}``
    and ``{journal}`` (the breaker's journal in the service's workdir)."""
    with JwksServer(rsa, make_ec_key(f"{name}-ec")) as jwks:
        workdir = tmp_path_factory.mktemp(name)
        path = workdir / "policy.yaml"
        path.write_text(policy.format(jwks_url=jwks.url, journal=workdir / "journal.jsonl"))
        args = ["--ledger", redis.url + query]
        with AuthzService(path, grpc_port=authz_port, workdir=workdir, extra_args=args) as svc:
            yield svc


def day_counter(redis: RedisServer, org: str, budget: str, user: str) -> tuple[int, int] | None:
    """(used, held) of the user's day counter of ``budget`` in Redis; None before it exists."""
    start = int(time.time() // 86400 * 86400)
    key = f"authz:{{{org}}}:c:{budget}|org:{org}/user:{user}|{start}"
    client = redis_py.Redis.from_url(redis.url)
    try:
        a, u, r = client.hmget(key, "a", "u", "r")
    finally:
        client.close()
    return None if a is None else (int(u or 0), int(r or 0))
