"""The Redis connection and the Lua scripts: the only module here that imports redis-py.

One client per ledger: a plain ``redis.asyncio.Redis`` on a bounded blocking pool, or a
``RedisCluster`` (which keeps one bounded pool per node), both with connect and command
timeouts and at most two quick retries (enough to reconnect after a Redis restart,
short enough to answer inside Envoy's ext_authz timeout). Every Redis failure leaves
this module as :class:`authz.errors.LedgerUnavailable`, raised ``from`` the original.

Scripts are redis-py ``Script`` objects: they run by EVALSHA and, on ``NOSCRIPT`` (a
restarted or failed-over Redis has forgotten them), load themselves and run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authz.errors import LedgerUnavailable
from authz.ledger.redis.config import RedisOptions

__all__ = ["RedisClient", "load_lua"]

log = logging.getLogger("authz.ledger.redis")
SCRIPTS = ("reserve", "settle", "expire", "lease", "charge", "confirm")
# RedisClusterException is not a RedisError (e.g. no node reachable to learn the slots).
_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


class _SafeRetry(Retry):
    """Retries only what cannot have run: a broken connection, or a connect that timed out.

    A script whose reply was late may have run, and running it again is not a no-op
    (reserve answered "reservation id already in use", a charge or settle reported "not
    done" for usage that was counted once): such a timeout is the breaker's to handle.
    A timeout while *connecting* sent nothing, so it is retried like a refused connect
    (32 connections opening at once beside two CPU hogs missed a 0.5 s connect timeout).
    """

    async def call_with_retry(  # type: ignore[override]
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, RedisTimeoutError) and not connect_timeout(error):
                return False
            return is_retryable is None or bool(is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def connect_timeout(error: Exception) -> bool:
    """redis-py's words for a timeout before anything was sent (asyncio connection)."""
    return str(error).startswith("Timeout connecting to server")


def load_lua(name: str) -> str:
    """A script's source with the shared helpers (lib.lua) in front of it."""
    pkg = files("authz.ledger.redis")
    return pkg.joinpath("lib.lua").read_text() + "\n" + pkg.joinpath(f"{name}.lua").read_text()


class RedisClient:
    def __init__(self, opts: RedisOptions) -> None:
        self.opts = opts
        backoff = ExponentialBackoff(cap=0.05, base=0.01)
        retry = _SafeRetry(backoff, 2, supported_errors=(RedisConnectionError, RedisTimeoutError))
        common: dict[str, Any] = {
            "username": opts.username,
            "password": opts.password,
            "socket_timeout": opts.timeout_s,
            "socket_connect_timeout": opts.connect_timeout_s,
            "retry": retry,
        }
        self.redis: Redis | RedisCluster
        if opts.cluster:
            self.redis = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in opts.hosts],
                max_connections=opts.pool,
                ssl=opts.tls,
                **common,
            )
        else:
            host, port = opts.hosts[0]
            pool_kwargs: dict[str, Any] = {}
            if opts.tls:
                from redis.asyncio.connection import SSLConnection

                pool_kwargs["connection_class"] = SSLConnection
            pool = BlockingConnectionPool(
                host=host,
                port=port,
                db=opts.db,
                max_connections=opts.pool,
                timeout=opts.timeout_s,  # waiting for a free connection counts as slow
                **common,
                **pool_kwargs,
            )
            self.redis = Redis.from_pool(pool)  # closing the client closes the pool
        # Bounds commands in flight: redis-py's cluster pools fail (not wait) when full.
        self._slots = asyncio.Semaphore(opts.pool)
        # redis-py's cluster client learns the slots on first use; concurrent first
        # commands race that set-up and lose their connections, so it is done once, first.
        self._ready = not opts.cluster
        self._init = asyncio.Lock()
        self._scripts: dict[str, AsyncScript] = {
            name: self.redis.register_script(load_lua(name)) for name in SCRIPTS
        }

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            async with self._slot():
                return await self._scripts[name](keys=keys, args=args)
        except _ERRORS as exc:
            raise self._unavailable(f"{name}.lua", exc) from exc

    async def call(self, what: str, *args: Any) -> Any:
        """One plain command, e.g. ``call("HMGET", key, "a", "u")``."""
        try:
            async with self._slot():
                return await self.redis.execute_command(what, *args)
        except _ERRORS as exc:
            raise self._unavailable(what, exc) from exc

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if not self._ready:
            async with self._init:
                if not self._ready and isinstance(self.redis, RedisCluster):
                    await self.redis.initialize()
                self._ready = True
        # Waiting for a free connection counts against the command timeout. (Not
        # wait_for: on Python 3.11 it can swallow the caller's cancel.)
        async with asyncio.timeout(self.opts.timeout_s):
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    def _unavailable(self, what: str, exc: Exception) -> LedgerUnavailable:
        # The message names the server without credentials; redis-py's own never has them.
        log.debug("redis %s failed on %s: %s", what, self.opts.safe(), exc)
        return LedgerUnavailable(f"redis {what} failed on {self.opts.safe()}: {exc}")

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except RedisError as exc:  # pragma: no cover - closing a dead connection
            log.warning("closing redis: %s", exc)
