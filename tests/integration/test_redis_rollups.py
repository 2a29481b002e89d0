"""Usage rollups per node and model, hourly and daily, written by the settle scripts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from authz.clock import FakeClock
from authz.ledger import Limit, Reservation, open_ledger
from authz.ledger.lease import LeasedLedger
from authz.ledger.redis.ledger import RedisLedger
from authz.ledger.rollup import UsageRow, bucket_starts
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.support.redis_proc import RedisServer

pytestmark = pytest.mark.integration

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ORG, TEAM = "org:acme", "org:acme/team:nlp"
ONE = Weights()


@pytest.fixture(params=["lease=off", "lease=on&lease_flush_ms=10"])
async def ledger(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[RedisLedger | LeasedLedger, FakeClock]]:
    clock = FakeClock(START + 600)
    led = open_ledger(f"{redis_server.url}?{request.param}", clock)
    assert isinstance(led, RedisLedger | LeasedLedger)
    yield led, clock
    await led.close()


def limits(clock: FakeClock) -> tuple[Limit, ...]:
    heavy = Weights(input=1, cached_input=0.5, output=4)
    return (
        Limit("org-day|org:acme|0", "org-day", ORG, 10**6, clock.now() + 86400, heavy),
        Limit("team-day|org:acme/team:nlp|0", "team-day", TEAM, 10**6, clock.now() + 86400, ONE),
    )


async def reserve(led: RedisLedger | LeasedLedger, clock: FakeClock, i: int, model: str) -> None:
    out = await led.reserve(f"{i:032x}@acme", limits(clock), TokenUsage(100, 0, 100),
                            deadline=clock.now() + 60, expiry_charge=TokenUsage(100, 0, 0),
                            model=model)  # fmt: skip
    assert isinstance(out, Reservation)


async def test_rollups_per_node_model_hour_and_day(
    ledger: tuple[RedisLedger | LeasedLedger, FakeClock],
) -> None:
    led, clock = ledger
    await reserve(led, clock, 1, "gpt-*")
    await reserve(led, clock, 2, "gpt-*")
    await reserve(led, clock, 3, "claude-*")
    assert (await led.settle(f"{1:032x}@acme", TokenUsage(10, 4, 5))).settled
    assert not (await led.settle(f"{1:032x}@acme", TokenUsage(10, 4, 5))).settled  # no double
    clock.advance(3600)  # the next hour, same day
    await led.settle(f"{2:032x}@acme", TokenUsage(20, 0, 1))
    await led.settle(f"{3:032x}@acme", TokenUsage(7, 0, 3))

    hours = await led.rollups(ORG, "hour", START, START + 7200)
    assert hours == [
        UsageRow(int(START), ORG, "gpt-*", 10, 4, 5, 10 + 2 + 20, 1),
        UsageRow(int(START) + 3600, ORG, "claude-*", 7, 0, 3, 7 + 12, 1),
        UsageRow(int(START) + 3600, ORG, "gpt-*", 20, 0, 1, 20 + 4, 1),
    ]
    days = await led.rollups(TEAM, "day", START, START + 86400)
    # The team's own budget weighs every token 1: its cost differs from the org's.
    assert days == [
        UsageRow(int(START), TEAM, "claude-*", 7, 0, 3, 10, 1),
        UsageRow(int(START), TEAM, "gpt-*", 30, 4, 6, 40, 2),
    ]


async def test_expiry_then_late_settle_corrects_the_rollup(
    ledger: tuple[RedisLedger | LeasedLedger, FakeClock],
) -> None:
    led, clock = ledger
    await reserve(led, clock, 1, "gpt-*")
    clock.advance(61)
    assert await led.expire(clock.now()) == 1
    (row,) = await led.rollups(ORG, "day", START, START + 86400)
    assert (row.input_tokens, row.output_tokens, row.units, row.requests) == (100, 0, 100, 1)
    assert (await led.settle(f"{1:032x}@acme", TokenUsage(30, 0, 10))).late
    (row,) = await led.rollups(ORG, "day", START, START + 86400)
    assert (row.input_tokens, row.output_tokens, row.units, row.requests) == (30, 10, 70, 1)


def test_bucket_starts_are_utc_aligned() -> None:
    assert bucket_starts("hour", START + 10, START + 3601) == [int(START), int(START) + 3600]
    assert bucket_starts("day", START + 5, START + 6) == [int(START)]
    assert bucket_starts("day", START + 5, START) == []
