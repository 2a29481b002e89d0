"""The Redis client retries what cannot have run twice, and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authz.ledger.redis.client import RedisClient
from authz.ledger.redis.config import parse_redis_url

pytestmark = pytest.mark.unit


def attempts(error: Callable[[], Exception]) -> int:
    """How many times the client's retry policy runs an operation that always fails so."""
    client = RedisClient(parse_redis_url("redis://127.0.0.1:1/?lease=off"))
    retry = client.redis.get_retry()
    assert retry is not None
    calls = 0

    async def do() -> None:
        nonlocal calls
        calls += 1
        raise error()

    async def fail(_: Exception) -> None:
        return None

    async def run() -> None:
        with pytest.raises(type(error())):
            await retry.call_with_retry(do, fail)
        await client.redis.aclose()

    asyncio.run(run())
    return calls


def test_redis_scripts_are_not_retried_after_a_timeout() -> None:
    # A late reply may mean the script ran: running it again is not a no-op (a retried
    # reserve answered "already in use"; a retried charge said "not charged").
    assert attempts(lambda: RedisTimeoutError("Timeout reading from 127.0.0.1:6379")) == 1


def test_a_broken_connection_is_retried_twice() -> None:
    assert attempts(lambda: RedisConnectionError("Connection reset by peer")) == 3


def test_a_connect_timeout_is_retried_as_nothing_was_sent() -> None:
    # redis-py raises this before a command is written: retrying cannot run it twice.
    assert attempts(lambda: RedisTimeoutError("Timeout connecting to server")) == 3
