"""The Redis ledger: the Ledger contract on one Redis or a Redis Cluster, exact and central.

Every reserve and settle is one atomic script (reserve.lua, settle.lua) on the org's
slot. Time comes from the injected clock and from the deadlines and window ends passed
in: Redis' own clock never decides a budget. TTLs are garbage collection only, and
relative (``PEXPIRE`` of the time left plus a margin), so a fake clock in tests and a
skewed clock in production both work. With leases on (the default), open_ledger wraps
this in :class:`authz.ledger.lease.LeasedLedger`, which uses :meth:`sync`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from authz.clock import Clock
from authz.ledger.base import Balance, Limit, Refusal, Reservation, SettleOutcome
from authz.ledger.redis.client import RedisClient
from authz.ledger.redis.config import RedisOptions
from authz.ledger.redis.keys import Keys
from authz.ledger.rollup import (
    DAY_RETENTION_S,
    HOUR_RETENTION_S,
    Granularity,
    UsageRow,
    bucket_starts,
    rows_from_fields,
)
from authz.usage.bounds import ledger_usage
from authz.usage.types import TokenUsage

__all__ = ["RedisLedger", "limit_args", "weights_args"]

_BURST_KEEP_S = 40 * 86400  # as MemoryLedger keeps a burst window's debt
_REGISTER_EVERY_S = 60.0
_SWEEP_BATCH = 500


def weights_args(limit: Limit) -> list[Any]:
    w = limit.weights
    return [w.input, w.cached_input, w.output, limit.per_request, int(limit.release_on_settle)]


def limit_args(limit: Limit) -> list[Any]:
    """What a script needs to open a limit's counter (burst/rollover carry key, nominal,
    rollover cap, inherited counter; lib.lua's open_counter) and whether it refuses."""
    return [limit.carry_from or "", limit.nominal, limit.rollover, limit.inherit or "",
            int(limit.enforce)]  # fmt: skip


def _tokens(t: TokenUsage) -> list[int]:
    # Clamped as every ledger clamps (authz.usage.bounds.ledger_usage): past 2**53 a Lua
    # number is no longer an exact integer, and HINCRBY refuses "1e+18" (lib.lua clamps
    # too, for anything that reaches a script another way, e.g. a lease flush).
    t = ledger_usage(t)
    return [t.input_tokens, t.cached_input_tokens, t.output_tokens]


class RedisLedger:
    confirms = True  # authz.confirm: a Check's hold waits for the gateway to use it

    def __init__(
        self,
        opts: RedisOptions,
        clock: Clock,
        *,
        remember_settled_s: float = 3600.0,
        parked_settle_s: float = 120.0,
    ) -> None:
        self.opts = opts
        self.client = RedisClient(opts)
        self.keys = Keys(opts.prefix)
        self._clock = clock
        self.remember_ms = int(remember_settled_s * 1000)
        self._parked_ms = int(parked_settle_s * 1000)
        self.rollup_ms = [HOUR_RETENTION_S * 1000, DAY_RETENTION_S * 1000]
        self._registered: dict[str, float] = {}

    def counter_ttl_ms(self, limit: Limit, now: float, until: float = 0.0) -> int:
        # Past the window (or the reservation's deadline): late settles must still find
        # it; a burst window's overdraft must still be there when the next one opens.
        keep = self.remember_ms / 1000 + 3600 + (_BURST_KEEP_S if limit.nominal else 0)
        return max(1000, int((max(limit.window_end, until) - now + keep) * 1000))

    async def register(self, tag: str) -> None:
        """Remember the org in the sweeper's set (again every minute: Redis may restart)."""
        now = time.monotonic()
        if self._registered.get(tag, -1e9) + _REGISTER_EVERY_S > now:
            return
        self._registered[tag] = now  # concurrent first checks of an org add it once
        try:
            await self.client.call("SADD", self.keys.orgs, tag)
        except BaseException:
            self._registered.pop(tag, None)
            raise

    # -- the Ledger contract --------------------------------------------------------
    async def reserve(
        self,
        reservation_id: str,
        limits: tuple[Limit, ...],
        tokens: TokenUsage,
        *,
        deadline: float,
        expiry_charge: TokenUsage,
        model: str = "",
    ) -> Reservation | Refusal:
        tokens, expiry_charge = ledger_usage(tokens), ledger_usage(expiry_charge)
        tag = self.keys.tag_for(reservation_id, limits)
        await self.register(tag)
        now = self._clock.now()
        keys = [self.keys.deadlines(tag), self.keys.record(tag, reservation_id)]
        args: list[Any] = [self.keys.base(tag), reservation_id, now, deadline,
                           self.remember_ms, model, *_tokens(tokens), *_tokens(expiry_charge),
                           len(limits)]  # fmt: skip
        for lim in limits:
            keys.append(self.keys.counter(tag, lim.key))
            args += [lim.key, lim.node, lim.amount, self.counter_ttl_ms(lim, now, deadline)]
            args += weights_args(lim) + limit_args(lim)
        out = await self.client.script("reserve", keys, args)
        if out[0] == -1:
            raise ValueError(f"reservation id {reservation_id!r} is already in use")
        if out[0] == 0:
            return Refusal(limits[int(out[1]) - 1], int(out[2]), int(out[3]))
        await self.index_rids([(reservation_id, tag, deadline)], now)
        units = tuple(lim.units(tokens) for lim in limits)
        return Reservation(reservation_id, limits, units, tuple(int(x) for x in out[1:]), deadline)

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        code = await self.settle_code(reservation_id, actual)
        return SettleOutcome(settled=code in (1, 2), late=code == 2)

    async def confirm(self, reservation_id: str, deadline: float, charge: TokenUsage) -> bool:
        """See confirm.lua: the hold lives to ``deadline``, charged ``charge`` then."""
        tag = await self.tag_of(reservation_id)
        now = self._clock.now()
        keep_ms = int((max(deadline - now, 0.0) + self.remember_ms / 1000 + 3600) * 1000)
        keys = [self.keys.deadlines(tag), self.keys.record(tag, reservation_id)]
        args = [self.keys.base(tag), reservation_id, now, deadline, self.remember_ms,
                *_tokens(ledger_usage(charge)), keep_ms]  # fmt: skip
        return int(await self.client.script("confirm", keys, args)) == 1

    async def index_rids(self, items: list[tuple[str, str, float]], now: float) -> None:
        """Remember the tag of ids that do not name their org: (id, tag, deadline)."""
        for rid, tag, deadline in items:
            if self.keys.needs_index(rid, tag):
                ttl = max(1, int((deadline - now) * 1000) + self.remember_ms)
                await self.client.call("SET", self.keys.rid_index(rid), tag, "PX", ttl)

    async def tag_of(self, reservation_id: str) -> str:
        if "@" in reservation_id:
            return self.keys.tag_for_id(reservation_id)
        tag = await self.client.call("GET", self.keys.rid_index(reservation_id))
        return tag.decode() if tag else self.keys.tag_for_id(reservation_id)

    async def settle_code(self, reservation_id: str, actual: TokenUsage, token: str = "") -> int:
        """settle.lua's answer: 1 settled, 2 late, 0 no-op, 3 parked (only with a token)."""
        tag = await self.tag_of(reservation_id)
        keys = [
            self.keys.deadlines(tag),
            self.keys.record(tag, reservation_id),
            self.keys.pending(tag, reservation_id),
        ]
        args = [self.keys.base(tag), reservation_id, self._clock.now(), *_tokens(actual),
                self.remember_ms, token, self._parked_ms, *self.rollup_ms]  # fmt: skip
        return int(await self.client.script("settle", keys, args))

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        tags = {self.keys.tag_for_limit(lim) for lim in limits}
        if len(tags) > 1:
            raise ValueError(f"charge {charge_id!r} spans several orgs: {sorted(tags)}")
        tag = tags.pop() if tags else self.keys.tag_for_id(charge_id)
        now = self._clock.now()
        keys = [self.keys.charge(tag, charge_id)]
        args: list[Any] = [self.keys.base(tag), self.remember_ms, *_tokens(actual), len(limits)]
        for lim in limits:
            keys.append(self.keys.counter(tag, lim.key))
            args += [lim.key, lim.amount, self.counter_ttl_ms(lim, now)]
            args += weights_args(lim) + limit_args(lim)
        return bool(await self.client.script("charge", keys, args))

    async def expire(self, now: float) -> int:
        tags = await self.client.call("SMEMBERS", self.keys.orgs)
        counts = await asyncio.gather(*(self._expire_org(t.decode(), now) for t in tags))
        return sum(counts)

    async def _expire_org(self, tag: str, now: float) -> int:
        total = 0
        while True:
            keys = [self.keys.deadlines(tag), self.keys.leases(tag)]
            args = [self.keys.base(tag), now, _SWEEP_BATCH, self.remember_ms, *self.rollup_ms]
            count, more, _ = await self.client.script("expire", keys, args)
            total += int(count)
            if not more:
                return total

    async def balance(self, limit: Limit) -> Balance:
        raw = await self.counter(limit)
        if raw[0] is None:
            return Balance(limit.amount, 0, 0)
        amount, used, reserved, leased = (int(x or 0) for x in raw[:4])
        return Balance(amount, used, reserved + leased)

    async def counter(self, limit: Limit, *fields: str) -> list[Any]:
        """The counter's a, u, r, l (and any other ``fields``), None where absent."""
        key = self.keys.counter(self.keys.tag_for_limit(limit), limit.key)
        return list(await self.client.call("HMGET", key, "a", "u", "r", "l", *fields))

    async def rollups(
        self, node: str, granularity: Granularity, start: float, end: float
    ) -> list[UsageRow]:
        """Usage of ``node`` per model in hourly or daily UTC buckets overlapping [start, end)."""
        tag = self.keys.tag_for_node(node)
        rows: list[UsageRow] = []
        for bucket in bucket_starts(granularity, start, end):
            raw = await self.client.call(
                "HGETALL", self.keys.rollup(tag, granularity, bucket, node)
            )
            fields = {k.decode(): int(v) for k, v in _pairs(raw)}
            rows.extend(rows_from_fields(bucket, node, fields))
        return rows

    async def sync(self, tag: str, keys: list[str], args: list[Any]) -> Any:
        """Run lease.lua for one org (see :mod:`authz.ledger.lease`)."""
        await self.register(tag)
        return await self.client.script("lease", keys, args)

    async def ping(self) -> None:
        """One PING: the readiness check's "can the store be reached" (raises if not)."""
        await self.client.call("PING")

    async def close(self) -> None:
        await self.client.close()


def _pairs(raw: Any) -> list[tuple[bytes, bytes]]:
    # HGETALL answers a dict (RESP2 callbacks) or a flat list, depending on redis-py.
    if isinstance(raw, dict):
        return list(raw.items())
    return list(zip(raw[::2], raw[1::2], strict=True))
