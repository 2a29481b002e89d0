"""The audit chain in a Redis stream, beside a redis:// ledger.

Entries go to the stream ``{<prefix>:audit}:log`` (field ``e``: the entry's JSON); the
head (seq, hash, stream id) is kept in ``{<prefix>:audit}:head`` so ``verify`` also
notices entries cut off the end. ``append.lua`` adds an entry only if the head is still
the one it was chained to, so several service processes extend one chain.

This module has its own small ``redis.asyncio`` client: it shares the ledger's *URL*
(host, db, credentials, ``prefix`` option), not its connection pool, so audit writes
never queue behind (or in front of) the quota traffic.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from authz.audit.chain import GENESIS, Entry, make_entry
from authz.errors import AuthzError

__all__ = ["AuditStoreError", "RedisAuditLog"]

_PAGE = 1000
_MAX_RACES = 50


class AuditStoreError(AuthzError):
    """The audit store could not be reached or refused the entry."""


def _client(url: str) -> tuple[Any, str]:
    """A redis.asyncio client for the ledger URL, and the key prefix it names."""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    scheme, _, rest = url.partition("://")
    parts = urlsplit(f"redis://{rest}")
    options = dict(parse_qsl(parts.query))
    prefix = options.get("prefix", "authz")
    password = unquote(parts.password) if parts.password else os.environ.get("AUTHZ_REDIS_PASSWORD")
    username = unquote(parts.username) if parts.username else None
    tls = scheme.startswith("rediss")
    hosts: list[tuple[str, int]] = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        name, _, number = item.rpartition(":") if ":" in item else (item, "", "6379")
        hosts.append((name.strip("[]") or "127.0.0.1", int(number or 6379)))
    common: dict[str, Any] = {
        "username": username,
        "password": password,
        "ssl": tls,
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
    }
    if scheme.endswith("+cluster"):
        nodes = [ClusterNode(h, p) for h, p in hosts]
        return RedisCluster(startup_nodes=nodes, **common), prefix
    db = int(parts.path.strip("/") or 0)
    host, port = hosts[0]
    return aredis.Redis(host=host, port=port, db=db, **common), prefix


class RedisAuditLog:
    def __init__(self, url: str) -> None:
        self._redis, prefix = _client(url)
        tag = "{" + prefix + ":audit}"
        self.stream_key = f"{tag}:log"
        self.head_key = f"{tag}:head"
        source = resources.files("authz.audit").joinpath("append.lua").read_text()
        self._script = self._redis.register_script(source)
        self._head: tuple[int, str] | None = None  # (seq, hash) as last seen

    async def _load_head(self) -> tuple[int, str]:
        got = await self._redis.hmget(self.head_key, ["seq", "hash"])
        if got[1] is None:
            return 0, GENESIS
        return int(got[0]), got[1].decode()

    async def append(self, kind: str, data: Mapping[str, Any], ts: float) -> Entry:
        from redis.exceptions import RedisError

        try:
            seq, prev = self._head or await self._load_head()
            for _ in range(_MAX_RACES):
                entry = make_entry(seq + 1, ts, kind, data, prev)
                expected = "" if prev == GENESIS else prev
                out = await self._script(
                    keys=[self.stream_key, self.head_key],
                    args=[expected, entry.seq, entry.to_json(), entry.hash],
                )
                if int(out[0]) == 1:
                    self._head = (entry.seq, entry.hash)
                    return entry
                # Another writer appended first: chain to its head and try again.
                prev = out[1].decode() if out[1] else GENESIS
                seq = int(out[2])
        except RedisError as exc:
            self._head = None
            raise AuditStoreError(f"audit append failed: {exc}") from exc
        raise AuditStoreError("audit append lost the race too many times")

    async def stored(self) -> AsyncIterator[tuple[str, bytes]]:
        start = "-"
        while True:
            page = await self._redis.xrange(self.stream_key, min=start, max="+", count=_PAGE)
            for entry_id, fields in page:
                sid = entry_id.decode()
                yield f"stream id {sid}", fields.get(b"e", b"")
            if len(page) < _PAGE:
                return
            start = "(" + page[-1][0].decode()

    async def head(self) -> str | None:
        seq, head = await self._load_head()
        return head if seq else None

    async def close(self) -> None:
        await self._redis.aclose()
