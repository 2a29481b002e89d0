"""Every allocation store (memory, the embedded SQLite file, Redis, Redis Cluster) keeps
allocations the same way: add, list, remove, purge, a version that moves on each write,
seen nodes; the persistent ones survive a new store object on the same place (a restart)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from authz.manage.model import Allocation
from authz.manage.store import AllocationStore, MemoryAllocationStore, open_allocation_store

Opener = Callable[[], AllocationStore]


def _opener(request: pytest.FixtureRequest, name: str) -> Opener:
    if name == "memory":
        store = MemoryAllocationStore()
        return lambda: store  # one process: a "restart" is the same object
    if name == "sqlite":
        tmp = request.getfixturevalue("tmp_path")
        return lambda: open_allocation_store("sqlite:///ledger.db", str(tmp))
    fixture = "redis_server" if name == "redis" else "redis_cluster"
    url = request.getfixturevalue(fixture).url
    return lambda: open_allocation_store(url + "?prefix=alloc-contract")


@pytest.fixture(params=[
    pytest.param("memory", marks=pytest.mark.unit),
    pytest.param("sqlite", marks=pytest.mark.unit),
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("cluster", marks=pytest.mark.integration),
])  # fmt: skip
async def opened(request: pytest.FixtureRequest) -> AsyncIterator[tuple[AllocationStore, Opener]]:
    opener = _opener(request, request.param)
    store = opener()
    for a in await store.all():  # a shared server from an earlier test
        await store.remove(a.id)
    yield store, opener
    await store.close()


def alloc(i: str, expires: float | None = None, tokens: int = 10) -> Allocation:
    return Allocation(i, "adjust", "org:acme/department:research", "dept-day", tokens, 100.0,
                      expires, "why", "key:ops", 100.0)


async def test_add_list_remove_and_version(opened: tuple[AllocationStore, Opener]) -> None:
    store, _ = opened
    v0 = await store.version()
    await store.add(alloc("a1"))
    v1 = await store.version()
    assert v1 != v0
    await store.add(alloc("a2", tokens=-5))
    assert sorted((a.id, a.tokens) for a in await store.all()) == [("a1", 10), ("a2", -5)]
    assert await store.remove("a1") is True
    assert await store.remove("a1") is False
    assert await store.version() not in (v0, v1)
    assert [a.id for a in await store.all()] == ["a2"]


async def test_purge_drops_only_long_expired(opened: tuple[AllocationStore, Opener]) -> None:
    store, _ = opened
    await store.add(alloc("old", expires=150.0))
    await store.add(alloc("open"))
    await store.add(alloc("later", expires=500.0))
    before = await store.version()
    assert await store.purge(200.0) == 1
    assert sorted(a.id for a in await store.all()) == ["later", "open"]
    assert await store.version() != before
    assert await store.purge(200.0) == 0


async def test_survives_a_restart_and_round_trips(opened: tuple[AllocationStore, Opener]) -> None:
    store, opener = opened
    made = alloc("keep", expires=1234.5)
    await store.add(made)
    await store.note_nodes(["org:acme", "org:acme/department:research/user:al%40x"])
    again = opener()
    try:
        assert await again.all() == (made,)
        assert {"org:acme", "org:acme/department:research/user:al%40x"} <= await again.nodes()
        assert await again.version() == await store.version()
    finally:
        if again is not store:
            await again.close()


async def test_requests_are_kept_and_replaced(opened: tuple[AllocationStore, Opener]) -> None:
    store, opener = opened
    before = set(await store.requests())
    await store.put_request("r1", '{"id": "r1", "status": "pending"}')
    await store.put_request("r1", '{"id": "r1", "status": "approved"}')
    await store.put_request("r2", '{"id": "r2", "status": "pending"}')
    again = opener()
    try:
        assert set(await again.requests()) - before == {
            '{"id": "r1", "status": "approved"}', '{"id": "r2", "status": "pending"}'}
    finally:
        if again is not store:
            await again.close()
