"""Allocations in Redis, beside a redis:// (or Redis Cluster) ledger's budgets.

Keys share one hash tag, so a cluster keeps them in one slot and ``write.lua`` can
change the set and its version in one step:

- ``{<prefix>:manage}:alloc``: a hash, allocation id -> JSON;
- ``{<prefix>:manage}:version``: bumped on each write; replicas poll it;
- ``{<prefix>:manage}:nodes``: a set of node keys seen in decisions;
- ``{<prefix>:manage}:requests``: a hash, quota request id -> JSON.

The client is the audit trail's (authz/audit/redis.py): the ledger's URL (host, db,
credentials, ``prefix``), a connection pool of its own, so management traffic never
queues in front of quota checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from authz.audit.redis import _client
from authz.errors import AuthzError
from authz.manage.model import Allocation
from authz.manage.store import MAX_NODES

__all__ = ["RedisAllocationStore"]


class RedisAllocationStore:
    def __init__(self, url: str) -> None:
        self._redis, prefix = _client(url)
        tag = "{" + prefix + ":manage}"
        self.hash_key = f"{tag}:alloc"
        self.version_key = f"{tag}:version"
        self.nodes_key = f"{tag}:nodes"
        self.requests_key = f"{tag}:requests"
        source = resources.files("authz.manage").joinpath("write.lua").read_text()
        self._script = self._redis.register_script(source)

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except Exception as exc:  # redis-py's errors, OSError, timeouts: one boundary
            raise AuthzError(f"allocation store (redis) {what}: {exc}") from exc

    async def _write(self, *args: str) -> int:
        keys = [self.hash_key, self.version_key]
        return int(await self._call(args[0], self._script(keys=keys, args=list(args))))

    async def add(self, allocation: Allocation) -> None:
        await self._write("set", allocation.id, allocation.to_json())

    async def remove(self, allocation_id: str) -> bool:
        return await self._write("del", allocation_id) > 0

    async def all(self) -> tuple[Allocation, ...]:
        raw = await self._call("read", self._redis.hvals(self.hash_key))
        return tuple(Allocation.from_json(body) for body in raw)

    async def version(self) -> str:
        got = await self._call("version", self._redis.get(self.version_key))
        return got.decode() if got is not None else "0"

    async def purge(self, before: float) -> int:
        return await self._write("purge", repr(before))

    async def note_nodes(self, nodes: Iterable[str]) -> None:
        batch = list(nodes)
        if not batch:
            return
        count = await self._call("nodes", self._redis.scard(self.nodes_key))
        if count < MAX_NODES:
            await self._call("nodes", self._redis.sadd(self.nodes_key, *batch))

    async def nodes(self) -> frozenset[str]:
        raw = await self._call("nodes", self._redis.smembers(self.nodes_key))
        return frozenset(n.decode() for n in raw)

    async def put_request(self, request_id: str, body: str) -> None:
        await self._call("request", self._redis.hset(self.requests_key, request_id, body))

    async def requests(self) -> tuple[str, ...]:
        raw = await self._call("requests", self._redis.hvals(self.requests_key))
        return tuple(b.decode() for b in raw)

    async def close(self) -> None:
        await self._redis.aclose()
