"""A token's subject is hostile input to an LDAP filter; a directory's values are hostile
input to node names. Against a real slapd, through the same code a check runs
(:func:`authz.directory.given_for` then :func:`authz.policy.subject.map_subject`).

Unescaped, ``*`` would match every user (the first one found would lend its
department), ``alice)(uid=*`` would widen the filter, a trailing ``\\`` or NUL would
break it; escaped (RFC 4515), each is a literal uid nobody has, and the caller is
refused (403 subject_unmapped), never placed in someone else's team.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.clock import FakeClock
from authz.directory import Directory, given_for
from authz.policy.directory import DirectorySettings, GroupSource, LevelSource
from authz.policy.model import HIERARCHY, LevelRule, SubjectRules
from authz.policy.subject import SubjectUnmapped, map_subject
from tests.support.slapd import BASE, READER_DN, READER_PASSWORD, Slapd, group_ldif, person_ldif

pytestmark = [pytest.mark.integration, pytest.mark.hostile]

RULES = SubjectRules(
    levels=(
        LevelRule("org", ("org",), missing="fallback", fallback="acme"),
        LevelRule("department", (), missing="deny"),
        LevelRule("team", (), missing="skip"),
    ),
    leaf=(LevelRule("user", ("sub",)),),
)
assert tuple(r.level for r in RULES.levels) == HIERARCHY


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with Slapd(tmp_path_factory.mktemp("slapd-hostile")) as server:
        server.add(
            person_ldif("alice", "research")
            + person_ldif("admin", "it")
            # a directory value written to name another node, counter or org slot
            + person_ldif("mallory", "finance/department:ceo")
            + group_ldif("team-nlp", ["alice"])
            + group_ldif("team-x}|y@z", ["mallory"])
        )
        yield server


@pytest.fixture
async def directory(slapd: Slapd, tmp_path: Path) -> AsyncIterator[Directory]:
    pw = tmp_path / "ldap.pw"
    pw.write_text(READER_PASSWORD)
    settings = DirectorySettings(
        url=slapd.url,
        bind_dn=READER_DN,
        password_file=str(pw),
        base_dn=f"ou=people,{BASE}",
        user_filter="(&(objectClass=inetOrgPerson)(uid={subject}))",
        groups=GroupSource(attribute="memberOf"),
        levels=(
            LevelSource("department", attribute="departmentNumber"),
            LevelSource("team", group=True, pattern=re.compile(r"^cn=team-(?P<name>[^,]+),")),
        ),
    )
    d = Directory(settings, FakeClock())
    yield d
    await d.aclose()


async def place(directory: Directory, claims: dict[str, Any]) -> str:
    return str(map_subject(RULES, claims, await given_for(directory, RULES, claims)))


async def test_a_plain_subject_is_placed(directory: Directory) -> None:
    assert await place(directory, {"sub": "alice"}) == (
        "org:acme/department:research/team:nlp/user:alice"
    )


@pytest.mark.parametrize(
    "hostile", ["*", "al*", "*ice", "alice)(uid=*", "*)(|(uid=*", "alice\\", "admin)(x=\0", "a*)"]
)
async def test_a_hostile_subject_is_placed_nowhere(directory: Directory, hostile: str) -> None:
    with pytest.raises(SubjectUnmapped, match="the directory names no department"):
        await place(directory, {"sub": hostile})
    assert directory.stats.lookups["not_found"] == 1 and directory.stats.lookups["error"] == 0


@pytest.mark.parametrize("claim", [["alice"], {"uid": "alice"}, True, "", "a" * 300])
async def test_a_subject_claim_no_directory_holds_is_not_looked_up(
    directory: Directory, claim: object
) -> None:
    with pytest.raises(SubjectUnmapped):
        await place(directory, {"sub": claim, "org": "acme"})
    assert sum(directory.stats.lookups.values()) == 0


async def test_directory_values_cannot_name_another_node(directory: Directory) -> None:
    path = await place(directory, {"sub": "mallory"})
    assert path == "org:acme/department:finance%2Fdepartment%3Aceo/team:x%7D%7Cy%40z/user:mallory"
