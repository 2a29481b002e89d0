"""The directory against a real OpenLDAP slapd: lookups (memberOf and a group search),
TTL, single flight, a hung and a stopped server, each on_down mode.

The clock is fake (TTLs move when told); the LDAP traffic is real. Hostile subjects and
directory values: tests/hostile/test_directory_injection.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.directory import Directory, DirectoryUnavailable
from authz.policy.directory import DirectorySettings, GroupSource, LevelSource, OnDown
from tests.support.certs import TestCA
from tests.support.slapd import (
    BASE,
    READER_DN,
    READER_PASSWORD,
    Slapd,
    group_ldif,
    person_ldif,
)

pytestmark = pytest.mark.integration
TEAM = r"^cn=team-(?P<name>[^,]+),ou=groups,"


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    with Slapd(tmp_path / "slapd") as server:
        server.add(
            person_ldif("alice", "research")
            + person_ldif("bob", "sales")
            + person_ldif("admin", "it")
            + group_ldif("team-nlp", ["alice"])
            + group_ldif("team-deals", ["bob"])
            + group_ldif("admins", ["alice", "admin"])
        )
        yield server


def settings(slapd: Slapd, tmp_path: Path, **changes: object) -> DirectorySettings:
    pw = tmp_path / "ldap.pw"
    pw.write_text(READER_PASSWORD + "\n")
    base = DirectorySettings(
        url=slapd.url,
        bind_dn=READER_DN,
        password_file=str(pw),
        base_dn=f"ou=people,{BASE}",
        user_filter="(&(objectClass=inetOrgPerson)(uid={subject}))",
        groups=GroupSource(attribute="memberOf"),
        levels=(
            LevelSource("department", attribute="departmentNumber"),
            LevelSource("team", group=True, pattern=__import__("re").compile(TEAM)),
        ),
        cache_s=100,
        negative_cache_s=10,
        timeout_s=1.0,
        retry_s=5,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def make(slapd: Slapd, tmp_path: Path) -> AsyncIterator[object]:
    made: list[Directory] = []

    def build(clock: FakeClock | None = None, **changes: object) -> Directory:
        d = Directory(settings(slapd, tmp_path, **changes), clock or FakeClock())
        made.append(d)
        return d

    yield build
    for d in made:
        await d.aclose()


async def test_department_and_team_from_memberof(make) -> None:  # type: ignore[no-untyped-def]
    d = make()
    assert dict(await d.levels("alice")) == {"department": "research", "team": "nlp"}
    assert dict(await d.levels("bob")) == {"department": "sales", "team": "deals"}
    assert dict(await d.levels("nobody")) == {}


async def test_department_and_team_from_a_group_search(make) -> None:  # type: ignore[no-untyped-def]
    groups = GroupSource(attribute=None, base_dn=f"ou=groups,{BASE}", filter="(member={dn})")
    d = make(groups=groups)
    assert dict(await d.levels("alice")) == {"department": "research", "team": "nlp"}


async def test_a_moved_user_is_seen_after_the_ttl(slapd: Slapd, make) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    d = make(clock)
    assert (await d.levels("alice"))["team"] == "nlp"
    slapd.modify(
        f"dn: cn=team-nlp,ou=groups,{BASE}\nchangetype: modify\n"
        f"delete: member\nmember: uid=alice,ou=people,{BASE}\n\n"
        f"dn: cn=team-deals,ou=groups,{BASE}\nchangetype: modify\n"
        f"add: member\nmember: uid=alice,ou=people,{BASE}\n\n"
    )
    clock.advance(50)
    assert (await d.levels("alice"))["team"] == "nlp"  # cached
    clock.advance(51)
    assert (await d.levels("alice"))["team"] == "deals"


async def test_single_flight(make) -> None:  # type: ignore[no-untyped-def]
    d = make()
    answers = await asyncio.gather(*(d.levels("alice") for _ in range(25)))
    assert {a["team"] for a in answers} == {"nlp"}
    assert sum(d.stats.lookups.values()) == 1


async def test_a_hung_directory_is_bounded_in_time(slapd: Slapd, make) -> None:  # type: ignore[no-untyped-def]
    d = make(timeout_s=0.5, on_down=OnDown("deny"))
    await d.levels("bob")  # the connection is up before the server hangs
    slapd.pause()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DirectoryUnavailable):
            await d.levels("alice")
        assert loop.time() - started < 3
        assert d.stats.lookups["timeout"] == 1 and not d.stats.up
    finally:
        slapd.resume()


async def test_on_down_last_known_then_recovery(slapd: Slapd, make) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    d = make(clock, on_down=OnDown("last_known"))
    await d.levels("alice")
    slapd.stop()
    clock.advance(200)  # alice's entry expired while the directory is down
    assert dict(await d.levels("alice")) == {"department": "research", "team": "nlp"}
    with pytest.raises(DirectoryUnavailable):
        await d.levels("bob")  # never seen
    assert d.stats.lookups["error"] == 1 and d.stats.answers["last_known"] == 1
    slapd.start()
    clock.advance(5)  # retry_s: the next miss probes, and the directory is back
    assert dict(await d.levels("bob")) == {"department": "sales", "team": "deals"}
    assert d.stats.up


async def test_on_down_fallback(slapd: Slapd, make) -> None:  # type: ignore[no-untyped-def]
    d = make(on_down=OnDown("fallback", (("department", "unassigned"),)))
    slapd.stop()
    assert dict(await d.levels("alice")) == {"department": "unassigned"}


async def test_on_down_deny(slapd: Slapd, make) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    d = make(clock, on_down=OnDown("deny"))
    await d.levels("alice")
    slapd.stop()
    assert (await d.levels("alice"))["team"] == "nlp"  # fresh in the cache: still served
    clock.advance(101)
    with pytest.raises(DirectoryUnavailable):
        await d.levels("alice")


async def test_a_wrong_password_is_a_failure_not_a_miss(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.pw"
    bad.write_text("wrong")
    d = make(password_file=str(bad), on_down=OnDown("deny"))
    with pytest.raises(DirectoryUnavailable):
        await d.levels("alice")
    assert d.stats.lookups["error"] == 1


@pytest.fixture
def tls_slapd(tmp_path: Path) -> Iterator[Slapd]:
    with Slapd(tmp_path / "slapd-tls", tls=True) as server:
        server.add(person_ldif("alice", "research") + group_ldif("team-nlp", ["alice"]))
        yield server


@pytest.mark.parametrize("how", ["ldaps", "start_tls"])
async def test_tls_with_the_servers_ca(tls_slapd: Slapd, tmp_path: Path, how: str) -> None:
    url = tls_slapd.ldaps_url if how == "ldaps" else tls_slapd.url
    s = settings(tls_slapd, tmp_path, url=url, start_tls=how == "start_tls",
                 ca_file=str(tls_slapd.ca_path))  # fmt: skip
    d = Directory(s, FakeClock())
    try:
        assert dict(await d.levels("alice")) == {"department": "research", "team": "nlp"}
    finally:
        await d.aclose()


@pytest.mark.parametrize("how", ["ldaps", "start_tls"])
async def test_tls_refuses_a_certificate_from_another_ca(
    tls_slapd: Slapd, tmp_path: Path, how: str
) -> None:
    other = TestCA("not-the-slapd-ca").write(tmp_path / "other-ca.crt")
    url = tls_slapd.ldaps_url if how == "ldaps" else tls_slapd.url
    s = settings(tls_slapd, tmp_path, url=url, start_tls=how == "start_tls",
                 ca_file=str(other), on_down=OnDown("deny"))  # fmt: skip
    d = Directory(s, FakeClock())
    try:
        with pytest.raises(DirectoryUnavailable):
            await d.levels("alice")
        assert d.stats.lookups["error"] == 1
    finally:
        await d.aclose()


async def test_tls_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    """The CA is right, the name is not: the certificate names localhost only, and the
    directory is reached as 127.0.0.1."""
    with Slapd(tmp_path / "slapd-tls", tls=True, tls_ips=()) as server:
        s = settings(server, tmp_path, url=server.ldaps_url, ca_file=str(server.ca_path),
                     on_down=OnDown("deny"))  # fmt: skip
        d = Directory(s, FakeClock())
        try:
            with pytest.raises(DirectoryUnavailable, match=r"certificate verify failed.*(mismatch|match)"):
                await d.levels("alice")
        finally:
            await d.aclose()
