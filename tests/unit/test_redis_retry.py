"""The Redis client retries what cannot have run twice, and nothing else."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_redis_scripts_are_not_retried_after_a_timeout() -> None:
    # A late reply may mean the script ran: running it again is not a no-op (a retried
    # reserve answered "already in use"; a retried charge said "not charged").
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from authz.ledger.redis.client import RedisClient
    from authz.ledger.redis.config import parse_redis_url

    client = RedisClient(parse_redis_url("redis://127.0.0.1:1/?lease=off"))
    retry = client.redis.get_retry()
    assert retry is not None
    errors = retry._supported_errors
    assert RedisConnectionError in errors and RedisTimeoutError not in errors
