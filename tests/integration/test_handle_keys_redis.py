"""The handle key shared through a real Redis (authz/handle_keys.py, ledger/redis/handle_key.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from authz.handle_keys import open_handle_keys
from authz.handles import HandleKeys
from tests.support.ports import free_port
from tests.support.redis_proc import RedisClusterProcs, RedisServer

pytestmark = pytest.mark.integration


async def _same_key(url: str) -> None:
    a, refresh_a = await open_handle_keys(None, url)
    b, refresh_b = await open_handle_keys(None, url)
    assert a.source == b.source == "redis" and a.key == b.key  # the first SET NX won
    assert refresh_a is not None and refresh_b is not None


async def test_replicas_share_one_key(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "authz.handles")
    await _same_key(redis_server.url)
    said = [r for r in caplog.records if r.getMessage() == "reservation handle key"]
    assert [r.source for r in said] == ["redis", "redis"]  # type: ignore[attr-defined]
    assert said[0].fingerprint == said[1].fingerprint  # type: ignore[attr-defined]


async def test_replicas_share_one_key_on_a_cluster(redis_cluster: RedisClusterProcs) -> None:
    await _same_key(redis_cluster.url)


async def test_a_redis_that_lost_the_key_gets_it_back(redis_server: RedisServer) -> None:
    a, refresh = await open_handle_keys(None, redis_server.url)
    assert refresh is not None
    redis_server.flush()  # a restart without persistence
    await refresh()
    b, _ = await open_handle_keys(None, redis_server.url)  # a replica started after
    assert b.key == a.key


async def test_unreachable_redis_at_start_then_adopted(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?connect_timeout=0.2&timeout=0.2"
    keys, refresh = await open_handle_keys(None, url)
    assert refresh is not None and keys.source.startswith("process")
    from authz.handles import Handle

    h = Handle("ab@acme", "org:acme/user:ann", "acme", "openai.chat", "gpt-4o", 1, 2, False)
    signed_alone = keys.sign(h)
    with RedisServer(tmp_path, port=port) as redis:
        peer, _ = await open_handle_keys(None, redis.url)  # another replica, Redis now up
        await refresh()
        assert keys.source == "redis" and keys.key == peer.key
        assert keys.verify(h, peer.sign(h)) is None  # settles the other replica's handles
        assert keys.verify(h, signed_alone) is None  # and its own from before
        assert HandleKeys(peer.key, "x").verify(h, signed_alone) is not None
