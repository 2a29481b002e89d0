"""Edge leases on a real Redis: two ledger instances play two replicas of the service.

Each replica has its own connection pool, its own leases and its own flush task, as
two ``authz serve`` processes would; only the Redis server is shared.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest

from authz.clock import FakeClock
from authz.ledger import Limit, Refusal, Reservation, open_ledger
from authz.ledger.lease import LeasedLedger
from authz.ledger.redis.ledger import RedisLedger
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.support.redis_proc import RedisClusterProcs, RedisServer

pytestmark = pytest.mark.integration

ZERO = TokenUsage(0, 0, 0)
Replicas = Callable[..., list[LeasedLedger]]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    made: list[LeasedLedger] = []

    def make(n: int = 2, query: str = "lease=on&lease_flush_ms=10", clock: FakeClock | None = None,
             url: str | None = None) -> list[LeasedLedger]:  # fmt: skip
        # No breaker here to journal a slow call: a busy machine's 0.5 s miss (600
        # concurrent calls) would fail what these tests prove, totals and no overshoot.
        query += "&timeout=5&connect_timeout=5"
        for _ in range(n):
            ledger = open_ledger(f"{url or redis_server.url}?{query}", clock or FakeClock())
            assert isinstance(ledger, LeasedLedger)
            made.append(ledger)
        return made[-n:]

    yield make
    for ledger in made:
        await ledger.close()


async def read_counter(url: str, limit: Limit) -> tuple[int, int, int, int]:
    """(amount, used, reserved, leased) read by a fresh client, e.g. after a close."""
    ledger = open_ledger(url + "?lease=off", FakeClock())
    assert isinstance(ledger, RedisLedger)
    try:
        a, u, r, leased = (int(x or 0) for x in await ledger.counter(limit))
    finally:
        await ledger.close()
    return a, u, r, leased


def org_limit(amount: int, clock: FakeClock, name: str = "acme") -> Limit:
    return Limit(f"org-daily|org:{name}|0", "org-daily", f"org:{name}", amount,
                 clock.now() + 86400, Weights())  # fmt: skip


def user_limit(user: str, amount: int, clock: FakeClock, org: str = "acme") -> Limit:
    node = f"org:{org}/user:{user}"
    return Limit(f"user-daily|{node}|0", "user-daily", node, amount, clock.now() + 86400, Weights())


def rid(i: int, org: str = "acme") -> str:
    return f"{i:032x}@{org}"


async def test_steady_load_is_decided_locally(replicas: Replicas, redis_server: RedisServer
                                              ) -> None:  # fmt: skip
    clock = FakeClock()
    a, b = replicas(2, clock=clock)
    org = org_limit(10_000_000, clock)
    users = [user_limit(f"u{i}", 1_000_000, clock) for i in range(4)]
    settled = 0
    for wave in range(40):
        ids = range(wave * 50, wave * 50 + 50)
        for i in ids:  # checks, spread over both replicas
            out = await (a if i % 2 else b).reserve(
                rid(i), (org, users[i % 4]), TokenUsage(300, 0, 200),
                deadline=clock.now() + 600, expiry_charge=ZERO,
            )  # fmt: skip
            assert isinstance(out, Reservation)
        await asyncio.sleep(0.02)  # the model answers; meanwhile the replicas flush
        for i in ids:
            # Envoy may deliver the response (settle) to the other replica: half do.
            actual = TokenUsage(280, 0, 100 + i % 50)
            assert (await (a if i % 4 < 2 else b).settle(rid(i), actual)).settled
            settled += actual.total
    local = a.local_checks + b.local_checks
    total = local + a.remote_checks + b.remote_checks
    print(f"\nlocal-decision share under steady load: {local / total:.2%} ({local} of {total})")
    assert local / total >= 0.95
    await a.flush()
    await b.flush()
    assert (await a.central.balance(org)).used == settled  # each settlement counted once
    await a.close()
    await b.close()
    _, used, reserved, leased = await read_counter(redis_server.url, org)
    assert (used, reserved, leased) == (settled, 0, 0)  # leases given back at shutdown


async def test_last_budget_is_spendable_by_whichever_replica_asks(replicas: Replicas) -> None:
    clock = FakeClock()
    a, b = replicas(2, query="lease=on&lease_flush_ms=10&lease_fraction=0.5", clock=clock)
    org = org_limit(1000, clock)
    # a takes a big lease (half of what is left) and spends from it...
    first = await a.reserve(rid(1), (org,), TokenUsage(100, 0, 0), deadline=clock.now() + 600,
                            expiry_charge=ZERO)  # fmt: skip
    assert isinstance(first, Reservation)
    assert a.remote_checks == 1
    await a.settle(rid(1), TokenUsage(100, 0, 0))
    # ...while b takes most of the rest centrally, one request after another.
    spent, i = 100, 10
    while True:
        out = await b.reserve(rid(i), (org,), TokenUsage(50, 0, 0), deadline=clock.now() + 600,
                              expiry_charge=ZERO)  # fmt: skip
        if isinstance(out, Refusal):
            break
        await b.settle(rid(i), TokenUsage(50, 0, 0))
        spent, i = spent + 50, i + 1
    # The budget is spent to the last unit: a's idle lease came back when b ran short.
    assert spent == 1000 and out.remaining == 0
    bal = await b.balance(org)
    assert (bal.used, bal.remaining) == (1000, 0)


async def test_near_exhaustion_leases_shrink_and_return(replicas: Replicas) -> None:
    clock = FakeClock()
    a, b = replicas(2, query="lease=on&lease_flush_ms=10&lease_fraction=0.5", clock=clock)
    org = org_limit(1000, clock)
    out = await a.reserve(rid(1), (org,), TokenUsage(10, 0, 0), deadline=clock.now() + 600,
                          expiry_charge=ZERO)  # fmt: skip
    assert isinstance(out, Reservation)
    _, _, _, leased = (int(x or 0) for x in await a.central.counter(org))
    assert leased > 400  # 10 for the request + half of the rest
    # b needs more than is free centrally: Redis marks the counter draining, a gives
    # its unused lease back on its next flush, and b's check waits for that.
    big = await b.reserve(rid(2), (org,), TokenUsage(900, 0, 0), deadline=clock.now() + 600,
                          expiry_charge=ZERO)  # fmt: skip
    assert isinstance(big, Reservation)
    # From now on leases carry no extra slice: exact single reservations.
    small = await a.reserve(rid(3), (org,), TokenUsage(90, 0, 0), deadline=clock.now() + 600,
                            expiry_charge=ZERO)  # fmt: skip
    assert isinstance(small, Reservation)
    none = await b.reserve(rid(4), (org,), TokenUsage(1, 0, 0), deadline=clock.now() + 600,
                           expiry_charge=ZERO)  # fmt: skip
    assert isinstance(none, Refusal) and none.remaining == 0
    assert (await a.balance(org)).reserved == 1000


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_two_replicas_under_concurrency_never_overshoot(
    backend: str, replicas: Replicas, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_cluster").url if backend == "cluster" else None
    clock = FakeClock()
    a, b = replicas(2, query="lease=on&lease_flush_ms=5&lease_fraction=0.2", clock=clock, url=url)
    org = org_limit(20_000, clock)
    sizes = random.Random(7).choices(range(1, 200), k=600)

    async def one(i: int, size: int) -> int:
        replica = a if i % 2 else b
        out = await replica.reserve(rid(i), (org, user_limit(f"u{i % 7}", 5000, clock)),
                                    TokenUsage(size, 0, 0), deadline=clock.now() + 600,
                                    expiry_charge=ZERO)  # fmt: skip
        if isinstance(out, Refusal):
            return 0
        if i % 3 == 0:  # settle some, on either replica, for less than reserved
            await (b if i % 2 else a).settle(rid(i), TokenUsage(size // 2, 0, 0))
            return size // 2
        return size

    held = await asyncio.gather(*(one(i, s) for i, s in enumerate(sizes)))
    await a.flush()
    await b.flush()
    _, used, reserved, leased = (int(x or 0) for x in await a.central.counter(org))
    assert used + reserved + leased <= 20_000  # leases included: nothing can overshoot
    assert used + reserved == sum(held) <= 20_000
    # Nothing is stranded in the other replica's leases: the rest is spendable by either.
    rest = 20_000 - used - reserved
    if rest:
        big = Limit("big|org:acme/user:big|0", "big", "org:acme/user:big", 10**9,
                    clock.now() + 86400, Weights())  # fmt: skip
        last = await b.reserve(rid(10_000), (org, big), TokenUsage(rest, 0, 0),
                               deadline=clock.now() + 600, expiry_charge=ZERO)  # fmt: skip
        assert isinstance(last, Reservation)


async def test_settle_on_another_replica_before_the_owner_flushed(replicas: Replicas) -> None:
    clock = FakeClock()
    # A slow flush on the owner: the settle arrives at b while a still holds it locally.
    (a,) = replicas(1, query="lease=on&lease_flush_ms=150", clock=clock)
    (b,) = replicas(1, query="lease=on&lease_flush_ms=10", clock=clock)
    org = org_limit(100_000, clock)
    out = await a.reserve(rid(1), (org,), TokenUsage(500, 0, 0), deadline=clock.now() + 600,
                          expiry_charge=ZERO)  # fmt: skip
    assert isinstance(out, Reservation)
    first = await b.settle(rid(1), TokenUsage(123, 0, 0))
    assert first.settled  # parked in Redis, applied by a's flush, confirmed to b
    assert not (await b.settle(rid(1), TokenUsage(123, 0, 0))).settled
    assert not (await a.settle(rid(1), TokenUsage(123, 0, 0))).settled
    bal = await a.balance(org)
    assert (bal.used, bal.reserved) == (123, 0)


async def test_dead_replica_lease_counts_as_spent(replicas: Replicas) -> None:
    clock = FakeClock()
    a, b = replicas(2, query="lease=on&lease_flush_ms=10&lease_ttl=5&lease_fraction=0.5", clock=clock)
    org = org_limit(1000, clock)
    await a.reserve(rid(1), (org,), TokenUsage(10, 0, 0), deadline=clock.now() + 600,
                    expiry_charge=ZERO)  # fmt: skip
    await a.flush()
    _, _, _, leased = (int(x or 0) for x in await a.central.counter(org))
    a._stop.set()  # a "dies": no more flushes, no give-back
    await asyncio.sleep(0.05)
    clock.advance(6)  # past the lease TTL
    await b.expire(clock.now())
    used, reserved, left = (int(x or 0) for x in (await b.central.counter(org))[1:4])
    # What a admitted from its lease is unknowable: it all counts as spent.
    assert (used, reserved, left) == (leased, 10, 0)


async def test_shutdown_gives_leases_back(replicas: Replicas, redis_cluster: RedisClusterProcs
                                          ) -> None:  # fmt: skip
    clock = FakeClock()
    (a,) = replicas(1, clock=clock, url=redis_cluster.url)
    org = org_limit(1_000_000, clock, name="other")
    for i in range(5):
        out = await a.reserve(rid(i, "other"), (org,), TokenUsage(10, 0, 0),
                              deadline=clock.now() + 600, expiry_charge=ZERO)  # fmt: skip
        assert isinstance(out, Reservation)
    assert a.local_checks == 4 and a.remote_checks == 1
    await a.close()
    _, used, reserved, leased = await read_counter(redis_cluster.url, org)
    assert (used, reserved, leased) == (0, 50, 0)


async def test_quiet_org_state_is_kept_so_one_replica_has_one_view_of_its_lease(
    replicas: Replicas,
) -> None:
    # A leader can hold a batch for an org (taken off org.waiting, waiting for the lock)
    # while a flush finds the org quiet. Dropping the org's state then left that leader
    # with a detached copy while the next check built a second one: two local views of
    # this replica's single lease in Redis, each admitting against it (an overshoot seen
    # once in the two-replica e2e burst). The state must survive a quiet flush.
    clock = FakeClock()
    (a,) = replicas(1, clock=clock)
    org = org_limit(1_000, clock)
    out = await a.reserve(rid(1), (org,), TokenUsage(10, 0, 0), deadline=clock.now() + 600,
                          expiry_charge=ZERO)  # fmt: skip
    assert isinstance(out, Reservation)
    await a.settle(rid(1), TokenUsage(10, 0, 0))
    states = dict(a._orgs)
    assert states
    for state in states.values():
        for lease in state.leases.values():
            lease.last_used = 0.0  # idle for ages: the next flush gives it back
    for _ in range(3):
        await a.flush()  # settles written, leases given back: the org is quiet
    assert all(lz.granted == 0 for st in states.values() for lz in st.leases.values())
    assert all(a._orgs.get(tag) is state for tag, state in states.items())
