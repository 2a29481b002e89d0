"""What one quota record costs in Redis, measured (numbers for docs/capacity.md).

    pytest -q -s tests/integration/test_redis_capacity.py

prints bytes per counter (one budget window of one subject), per open reservation and
per rollup bucket, measured two ways on a real redis-server: ``MEMORY USAGE`` of sample
keys, and the growth over N records of ``MEMORY STATS`` dataset bytes plus the main and
expiry hash tables (all-in: key, value, dict entries, TTL; client buffers excluded),
the number to plan with. The assertions are loose ceilings, there to catch a record
format that suddenly grows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from authz.clock import FakeClock
from authz.ledger import Limit, Reservation, open_ledger
from authz.ledger.redis.ledger import RedisLedger
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.support.redis_proc import RedisServer

pytestmark = pytest.mark.integration

N = 4000
START = 1_767_225_600.0
ZERO = TokenUsage(0, 0, 0)


def node(i: int) -> str:
    # A realistic, not minimal, path: four levels and an e-mail address as the user.
    return f"org:acme/department:research/team:nlp/user:user{i:07d}@example.com"


def limit(i: int, clock: FakeClock) -> Limit:
    return Limit(f"user-daily|{node(i)}|{int(START)}", "user-daily", node(i), 1_000_000,
                 START + 86400, Weights(1, 0.5, 4))  # fmt: skip


def data_bytes(server: RedisServer) -> int:
    """Bytes of the dataset and its hash tables, without clients, scripts or buffers."""
    with redis.Redis(port=server.port) as r:
        stats = r.memory_stats()
    db = stats.get("db.0", {})
    return int(stats["dataset.bytes"]) + sum(int(v) for v in db.values())


def usage(server: RedisServer, key: str) -> int:
    return int(server.cli("MEMORY", "USAGE", key, "SAMPLES", "0").strip())


def delete(server: RedisServer, pattern: str) -> None:
    keys = server.cli("--scan", "--pattern", pattern).split()
    for i in range(0, len(keys), 500):
        server.cli("DEL", *keys[i : i + 500])


async def test_bytes_per_record(tmp_path: Path) -> None:
    clock = FakeClock(START + 3600)
    with RedisServer(tmp_path) as server:
        # A measurement, not a timing test: a busy machine made a reserve miss the 0.5 s
        # default (and 32 connections opening at once, the 0.5 s connect timeout).
        ledger = open_ledger(f"{server.url}?lease=off&timeout=10&connect_timeout=10", clock)
        assert isinstance(ledger, RedisLedger)
        sem = asyncio.Semaphore(32)

        async def reserve(i: int, model: str = "gpt-4o*") -> None:
            async with sem:
                out = await ledger.reserve(
                    f"{i:032x}@acme", (limit(i, clock),), TokenUsage(1200, 0, 800),
                    deadline=clock.now() + 600, expiry_charge=TokenUsage(1200, 0, 0), model=model,
                )  # fmt: skip
                assert isinstance(out, Reservation)

        await ledger.client.call("SADD", ledger.keys.orgs, "acme")
        await asyncio.gather(*(reserve(i) for i in range(N)))
        with_open = data_bytes(server)
        tag = "{acme}"
        sample = {
            "counter (MEMORY USAGE)": usage(server, f"authz:{tag}:c:{limit(7, clock).key}"),
            "open reservation record (MEMORY USAGE)": usage(server, f"authz:{tag}:r:{7:032x}@acme"),
        }
        delete(server, "authz:{acme}:r:*")
        server.cli("DEL", "authz:{acme}:dl")
        counters_only = data_bytes(server)
        delete(server, "authz:{acme}:c:*")
        # Deleting rather than counting from the start: a busy server holds memory
        # (client and script buffers) that is no key's.
        per_counter = (counters_only - data_bytes(server)) / N
        per_open = (with_open - counters_only) / N

        # Settle a second round: closed records (kept an hour) and hourly/daily rollups.
        await asyncio.gather(*(reserve(N + i) for i in range(N)))
        for i in range(N):
            await ledger.settle(f"{N + i:032x}@acme", TokenUsage(1000, 200, 300))
        sample["closed reservation record (MEMORY USAGE)"] = usage(
            server, f"authz:{tag}:r:{N + 7:032x}@acme"
        )
        hour = int(START + 3600)
        sample["rollup bucket, one model (MEMORY USAGE)"] = usage(
            server, f"authz:{tag}:u:h:{hour}:{node(N + 7)}"
        )
        before_closed = data_bytes(server)
        delete(server, "authz:{acme}:r:*")
        per_closed = (before_closed - data_bytes(server)) / N
        before_rollups = data_bytes(server)
        delete(server, "authz:{acme}:u:*")
        per_rollup = (before_rollups - data_bytes(server)) / (2 * N)
        await ledger.close()

    measured = {
        "counter, all-in (MEMORY STATS growth)": per_counter,
        "open reservation incl. deadline entry, all-in": per_open,
        "settled reservation (kept 1 h), all-in": per_closed,
        "rollup bucket, all-in": per_rollup,
        **sample,
    }
    print(f"\nRedis {N} records, key paths like {limit(7, clock).key!r}:")
    for what, size in measured.items():
        print(f"  {what:<48} {size:8.0f} B")
    for subjects in (100_000_000,):
        gib = subjects * per_counter / 2**30
        print(f"  100M counters: {gib:.1f} GiB of data")
    assert per_counter < 400 and per_open < 800 and per_closed < 250 and per_rollup < 400
