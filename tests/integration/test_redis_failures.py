"""A Redis that restarts, goes away, or wants a password: real servers, real failures."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from authz.clock import FakeClock
from authz.errors import LedgerUnavailable
from authz.ledger import Ledger, Limit, Reservation, open_ledger
from authz.ledger.redis.client import load_lua
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.support.redis_proc import RedisClusterProcs, RedisServer

pytestmark = pytest.mark.integration

ZERO = TokenUsage(0, 0, 0)
SECRET = "s3cr3t-pa55"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A server of this test's own, free to restart or stop."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def limit(clock: FakeClock) -> Limit:
    return Limit("d|org:acme|0", "d", "org:acme", 10_000, clock.now() + 3600, Weights())


async def reserve(ledger: Ledger, clock: FakeClock, i: int) -> object:
    return await ledger.reserve(f"{i:032x}@acme", (limit(clock),), TokenUsage(10, 0, 0),
                                deadline=clock.now() + 60, expiry_charge=ZERO)  # fmt: skip


@pytest.mark.parametrize("query", ["lease=off", "lease=on&lease_flush_ms=10"])
async def test_restart_between_two_requests_reloads_scripts(
    own_redis: RedisServer, query: str
) -> None:
    clock = FakeClock()
    ledger = open_ledger(f"{own_redis.url}?{query}", clock)
    try:
        assert isinstance(await reserve(ledger, clock, 1), Reservation)
        own_redis.restart()  # an empty Redis: no data, no scripts, dead pooled connections
        sha = hashlib.sha1(load_lua("reserve" if "off" in query else "lease").encode())
        assert own_redis.cli("SCRIPT", "EXISTS", sha.hexdigest()).strip() == "0"
        clock.advance(60)  # leases no longer valid locally: the next check needs Redis
        assert isinstance(await reserve(ledger, clock, 2), Reservation)
        assert isinstance(await reserve(ledger, clock, 3), Reservation)
        assert (await ledger.settle(f"{2:032x}@acme", TokenUsage(7, 0, 0))).settled
    finally:
        await ledger.close()


@pytest.mark.parametrize("query", ["lease=off", "lease=on&lease_flush_ms=10"])
async def test_redis_down_is_ledger_unavailable(own_redis: RedisServer, query: str) -> None:
    clock = FakeClock()
    ledger = open_ledger(f"{own_redis.url}?{query}", clock)
    try:
        assert isinstance(await reserve(ledger, clock, 1), Reservation)
        own_redis.stop()
        clock.advance(60)  # leases no longer valid: the next check needs Redis
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable) as err:
            await reserve(ledger, clock, 2)
        assert time.monotonic() - started < 2.0  # fails fast, inside a check's budget
        assert isinstance(err.value.__cause__, RedisError | OSError)
        with pytest.raises(LedgerUnavailable):
            await ledger.settle(f"{9:032x}@acme", TokenUsage(1, 0, 0))
        with pytest.raises(LedgerUnavailable):
            await ledger.expire(clock.now())
    finally:
        await ledger.close()  # a dead Redis must not hang or crash shutdown


async def test_unreachable_cluster_is_ledger_unavailable() -> None:
    from tests.support.ports import free_port

    ledger = open_ledger(f"redis+cluster://127.0.0.1:{free_port()}?lease=off", FakeClock())
    try:
        with pytest.raises(LedgerUnavailable):
            await reserve(ledger, FakeClock(), 1)
    finally:
        await ledger.close()


async def test_password_from_url_or_env_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(tmp_path, extra=("--requirepass", SECRET)) as server:
        host = server.url.removeprefix("redis://")
        clock = FakeClock()
        good = open_ledger(f"redis://:{SECRET}@{host}?lease=off", clock)
        assert isinstance(await reserve(good, clock, 1), Reservation)
        await good.close()
        monkeypatch.setenv("AUTHZ_REDIS_PASSWORD", SECRET)
        from_env = open_ledger(f"{server.url}?lease=off", clock)
        assert isinstance(await reserve(from_env, clock, 2), Reservation)
        assert SECRET not in repr(from_env.__dict__)
        await from_env.close()
        monkeypatch.delenv("AUTHZ_REDIS_PASSWORD")
        bad = open_ledger(f"redis://:wrong-{SECRET}@{host}?lease=off", clock)
        with pytest.raises(LedgerUnavailable) as err:
            await reserve(bad, clock, 3)
        await bad.close()
    assert SECRET not in str(err.value)
    assert SECRET not in caplog.text


async def test_cluster_nodes_that_forgot_the_scripts(redis_cluster: RedisClusterProcs) -> None:
    # What a failover to a fresh replica looks like to the client: NOSCRIPT on the slot's
    # node. The scripts load themselves there and the call goes through.
    clock = FakeClock()
    ledger = open_ledger(f"{redis_cluster.url}?lease=on&lease_flush_ms=10", clock)
    try:
        assert isinstance(await reserve(ledger, clock, 1), Reservation)
        for node in redis_cluster.nodes:
            node.cli("SCRIPT", "FLUSH")
        clock.advance(60)
        assert isinstance(await reserve(ledger, clock, 2), Reservation)
        assert (await ledger.settle(f"{2:032x}@acme", TokenUsage(7, 0, 0))).settled
    finally:
        await ledger.close()
