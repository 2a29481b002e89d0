"""The directory cache with a fake lookup and a fake clock: TTLs, single flight,
refresh ahead, the size bound and each on_down mode. (The same against a real slapd:
tests/integration/test_directory_slapd.py.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace

import pytest

from authz.clock import FakeClock
from authz.directory import Directory, DirectoryUnavailable, directory_nodes, given_for
from authz.policy.directory import DirectorySettings, LevelSource, OnDown
from authz.policy.model import LevelRule, Node, SubjectRules
from authz.policy.subject import map_subject

pytestmark = pytest.mark.unit

SETTINGS = DirectorySettings(
    url="ldap://127.0.0.1:1",
    base_dn="ou=people,dc=example,dc=com",
    user_filter="(uid={subject})",
    levels=(LevelSource("department", attribute="departmentNumber"),),
    cache_s=100.0,
    negative_cache_s=10.0,
    refresh_ahead=0.2,
    timeout_s=0.5,
    retry_s=5.0,
)


class FakeDirectory:
    """A lookup function: answers from ``people``, or raises while ``down``."""

    def __init__(self) -> None:
        self.people: dict[str, dict[str, str]] = {"alice": {"department": "research"}}
        self.calls: list[str] = []
        self.down = False
        self.gate: threading.Event | None = None  # set: lookups wait for it

    def __call__(self, subject: str) -> Mapping[str, str] | None:
        self.calls.append(subject)
        if self.gate is not None:
            self.gate.wait(10)
        if self.down:
            raise DirectoryUnavailable("connection refused")
        return self.people.get(subject)


@pytest.fixture
def fake() -> Iterator[FakeDirectory]:
    f = FakeDirectory()
    yield f
    if f.gate is not None:
        f.gate.set()


def make(fake: FakeDirectory, clock: FakeClock, **changes: object) -> Directory:
    return Directory(replace(SETTINGS, **changes), clock, lookup=fake)  # type: ignore[arg-type]


async def test_ttl_and_negative_ttl(fake: FakeDirectory) -> None:
    clock = FakeClock()
    d = make(fake, clock)
    try:
        assert dict(await d.levels("alice")) == {"department": "research"}
        assert dict(await d.levels("nobody")) == {}
        clock.advance(9)
        await d.levels("alice")
        await d.levels("nobody")
        assert fake.calls == ["alice", "nobody"]  # both cached
        clock.advance(2)  # the negative answer expired (10 s), the positive has not
        await d.levels("nobody")
        assert fake.calls == ["alice", "nobody", "nobody"]
        fake.people["alice"] = {"department": "sales"}
        clock.advance(90)  # 101 s: alice's entry expired
        assert dict(await d.levels("alice")) == {"department": "sales"}
        assert d.stats.lookups["found"] == 2 and d.stats.answers["hit"] == 1
    finally:
        await d.aclose()


async def test_single_flight(fake: FakeDirectory) -> None:
    fake.gate = threading.Event()
    d = make(fake, FakeClock())
    try:
        waiting = [asyncio.create_task(d.levels("alice")) for _ in range(20)]
        # The first lookup is in the directory (held at the gate) and every task has run
        # to its wait: a condition, not a time, so a loaded machine cannot turn this into
        # a test of the cache instead of the single flight.
        for _ in range(1000):
            if fake.calls and all(not t.done() for t in waiting):
                break
            await asyncio.sleep(0.005)
        for _ in range(5):
            await asyncio.sleep(0)
        assert fake.calls == ["alice"] and not any(t.done() for t in waiting)
        fake.gate.set()
        answers = await asyncio.gather(*waiting)
        assert {a["department"] for a in answers} == {"research"}
        assert fake.calls == ["alice"]
    finally:
        await d.aclose()


async def test_an_active_subject_is_refreshed_before_expiry(fake: FakeDirectory) -> None:
    clock = FakeClock()
    d = make(fake, clock)
    try:
        await d.levels("alice")
        fake.people["alice"] = {"department": "sales"}
        clock.advance(85)  # inside the last 20% of 100 s: answered, refreshed behind
        assert dict(await d.levels("alice")) == {"department": "research"}
        for _ in range(100):
            if len(fake.calls) == 2 and not d._inflight:
                break
            await asyncio.sleep(0.01)
        clock.advance(20)  # past the first entry's expiry: the refreshed one answers
        assert dict(await d.levels("alice")) == {"department": "sales"}
        assert fake.calls == ["alice", "alice"]
    finally:
        await d.aclose()


async def test_size_bound_drops_least_recently_used(fake: FakeDirectory) -> None:
    fake.people.update({f"u{i}": {"department": f"d{i}"} for i in range(5)})
    d = make(fake, FakeClock(), max_entries=3)
    try:
        for i in range(5):
            await d.levels(f"u{i}")
        assert d.stats.entries == 3
        await d.levels("u0")  # dropped: asked again
        assert fake.calls.count("u0") == 2
    finally:
        await d.aclose()


async def test_on_down_last_known(fake: FakeDirectory) -> None:
    clock = FakeClock()
    d = make(fake, clock, on_down=OnDown("last_known"))
    try:
        await d.levels("alice")
        fake.down = True
        clock.advance(200)
        assert dict(await d.levels("alice")) == {"department": "research"}
        with pytest.raises(DirectoryUnavailable):  # never seen: nothing to fall back on
            await d.levels("bob")
        assert not d.stats.up and d.stats.answers["last_known"] == 1
    finally:
        await d.aclose()


async def test_on_down_fallback_and_deny(fake: FakeDirectory) -> None:
    fake.down = True
    fb = make(fake, FakeClock(), on_down=OnDown("fallback", (("department", "unassigned"),)))
    deny = make(fake, FakeClock(), on_down=OnDown("deny"))
    try:
        assert dict(await fb.levels("alice")) == {"department": "unassigned"}
        with pytest.raises(DirectoryUnavailable):
            await deny.levels("alice")
    finally:
        await fb.aclose()
        await deny.aclose()


async def test_down_fails_fast_then_probes(fake: FakeDirectory) -> None:
    clock = FakeClock()
    d = make(fake, clock, on_down=OnDown("deny"))
    try:
        fake.down = True
        for _ in range(5):
            with pytest.raises(DirectoryUnavailable):
                await d.levels("alice")
        assert len(fake.calls) == 1  # not asked again within retry_s
        fake.down = False
        clock.advance(5)
        assert dict(await d.levels("alice")) == {"department": "research"}
        assert d.stats.up
    finally:
        await d.aclose()


async def test_a_slow_directory_is_bounded_in_time(fake: FakeDirectory) -> None:
    fake.gate = threading.Event()  # never set until teardown: the lookup hangs
    d = make(fake, FakeClock(), timeout_s=0.2, on_down=OnDown("deny"))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DirectoryUnavailable, match="no answer within"):
            await d.levels("alice")
        assert loop.time() - started < 2
        assert d.stats.lookups["timeout"] == 1
    finally:
        fake.gate.set()
        await d.aclose()


async def test_directory_nodes_escapes_names(fake: FakeDirectory) -> None:
    fake.people["eve"] = {"department": "research/team:x", "team": "nlp"}
    d = make(fake, FakeClock(), levels=(
        LevelSource("department", attribute="departmentNumber"),
        LevelSource("team", attribute="ou"),
    ))  # fmt: skip
    try:
        assert await directory_nodes(d, "eve") == (
            Node("department", "research%2Fteam%3Ax"),
            Node("team", "nlp"),
        )
        assert await directory_nodes(d, "nobody") == ()
    finally:
        await d.aclose()


async def test_fill_mode_does_not_ask_when_claims_name_every_level(fake: FakeDirectory) -> None:
    rules = SubjectRules(
        levels=(LevelRule("org", ("org",)), LevelRule("department", ("department",))),
        leaf=(LevelRule("user", ("sub",)),),
    )
    fake.down = True
    d = make(fake, FakeClock(), mode="fill", on_down=OnDown("deny"))
    try:
        claims = {"org": "acme", "department": "finance", "sub": "alice"}
        path = map_subject(rules, claims, await given_for(d, rules, claims))
        assert str(path) == "org:acme/department:finance/user:alice"
        assert fake.calls == []  # the claims said it all: a directory outage is irrelevant
        with pytest.raises(DirectoryUnavailable):  # no department claim: asked, and down
            await given_for(d, rules, {"org": "acme", "sub": "alice"})
        assert fake.calls == ["alice"]
    finally:
        await d.aclose()
