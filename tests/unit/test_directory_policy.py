"""The ``directory`` policy section: what it builds, and every error with file:path,
and subject mapping with what a directory gave (replace, fill, hostile values)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.errors import PolicyError
from authz.policy.loader import parse_policy
from authz.policy.model import Node
from authz.policy.subject import Given, SubjectUnmapped, map_subject

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "version": 1,
    "identity": {"api_keys": [{"name": "k", "sha256": "0" * 64, "claims": {"sub": "x"}}]},
    "subject": {
        "org": {"claim": "org", "missing": {"fallback": "acme"}},
        "leaf": [{"level": "user", "claim": "sub"}],
    },
    "budgets": [{"name": "b", "match": {"team": "*"}, "tokens": 10, "period": "day"}],
}
DIRECTORY: dict[str, Any] = {
    "url": "ldap://ldap.example.com:389",
    "bind_dn": "cn=reader,dc=example,dc=com",
    "password_file": "ldap.pw",
    "base_dn": "ou=people,dc=example,dc=com",
    "user_filter": "(&(objectClass=inetOrgPerson)(uid={subject}))",
    "groups": {"attribute": "memberOf"},
    "levels": {
        "department": {"attribute": "departmentNumber"},
        "team": {"group": "^cn=team-(?P<name>[^,]+),ou=groups,", "missing": "skip"},
    },
}


def load(tmp_path: Path, directory: Any, subject: Any = None) -> Any:
    (tmp_path / "ldap.pw").write_text("secret\n")
    doc = {**BASE, "directory": directory}
    if subject is not None:
        doc["subject"] = subject
    file = tmp_path / "policy.yaml"
    file.write_text(yaml.safe_dump(doc))
    return parse_policy(yaml.safe_load(file.read_text()), str(file))


def test_a_directory_section_builds_settings_and_subject_rules(tmp_path: Path) -> None:
    policy = load(tmp_path, DIRECTORY)
    d = policy.directory
    assert d.password_file == str(tmp_path / "ldap.pw")
    assert d.level_names == ("department", "team") and d.mode == "replace"
    assert d.on_down.mode == "last_known" and d.cache_s == 300
    # department and team had no subject rule: added, in hierarchy order, reading
    # only the directory, with the directory level's missing rule
    levels = [(r.level, r.claims, r.missing) for r in policy.subject.levels]
    assert levels == [("org", ("org",), "fallback"), ("department", (), "deny"),
                      ("team", (), "skip")]  # fmt: skip


def test_on_down_fallback(tmp_path: Path) -> None:
    policy = load(tmp_path, {**DIRECTORY, "on_down": {"fallback": {"department": "unassigned"}}})
    assert policy.directory.on_down.fallback == (("department", "unassigned"),)


BAD = [
    (
        {"password": "hunter2"},
        "directory.password: is never written in the policy: use password_file",
    ),
    (
        {"url": "http://ldap"},
        "directory.url: must be ldap://host[:port] or ldaps://host[:port] (got 'http://ldap')",
    ),
    (
        {"url": "ldap://user:pw@host"},
        "directory.url: must be ldap://host[:port] or ldaps://host[:port] (got 'ldap://user:pw@host')",
    ),
    (
        {"url": "ldaps://h", "start_tls": True},
        "directory.start_tls: ldaps:// is TLS already; StartTLS is for ldap:// (got True)",
    ),
    ({"password_file": "nope.pw"}, "directory.password_file: file not found (got '{tmp}/nope.pw')"),
    (
        {"user_filter": "(uid=alice)"},
        "directory.user_filter: must contain {subject}, where the escaped value goes (got '(uid=alice)')",
    ),
    (
        {"user_filter": "(&(uid={subject})"},
        "directory.user_filter: is not a valid LDAP filter (RFC 4515) (got '(&(uid={subject})')",
    ),
    (
        {"levels": {"squad": {"attribute": "x"}}},
        "directory.levels.squad: unknown key; allowed: department, team",
    ),
    (
        {"levels": {"team": {"group": "^cn=(.+"}}},
        "directory.levels.team.group: is not a valid regular expression: missing ), unterminated subpattern at position 4 (got '^cn=(.+')",
    ),
    (
        {"levels": {"team": {"attribute": "ou", "group": "x"}}},
        "directory.levels.team: needs exactly one of attribute or group",
    ),
    ({"mode": "merge"}, "directory.mode: must be one of replace, fill (got 'merge')"),
    ({"cache_s": 0}, "directory.cache_s: must be a number >= 1 (got 0)"),
    ({"on_down": "ignore"}, "directory.on_down: must be one of last_known, deny (got 'ignore')"),
    (
        {"on_down": {"fallback": {"org": "x"}}},
        "directory.on_down.fallback.org: unknown key; allowed: department, team",
    ),
    (
        {"groups": {"base_dn": "ou=groups,dc=x", "filter": "(member=x)"}},
        "directory.groups.filter: must contain {dn}, where the escaped value goes (got '(member=x)')",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_directory_names_file_path_and_value(tmp_path: Path, change: dict[str, Any],
                                                 message: str) -> None:  # fmt: skip
    with pytest.raises(PolicyError) as err:
        load(tmp_path, {**DIRECTORY, **change})
    assert str(err.value) == f"{tmp_path / 'policy.yaml'}:{message.replace('{tmp}', str(tmp_path))}"


def test_bind_dn_without_password_file(tmp_path: Path) -> None:
    d = {k: v for k, v in DIRECTORY.items() if k != "password_file"}
    with pytest.raises(
        PolicyError, match=re.escape("directory: bind_dn and password_file go together")
    ):
        load(tmp_path, d)


def test_missing_on_a_level_the_subject_section_has(tmp_path: Path) -> None:
    subject = {**BASE["subject"], "team": {"claim": "team", "missing": "skip"}}
    with pytest.raises(PolicyError, match=re.escape(
        "directory.levels.team.missing: subject.team already says what happens when it is missing"
    )):  # fmt: skip
        load(tmp_path, DIRECTORY, subject)


# ---------------------------------------------------------------- map_subject + Given


def test_replace_ignores_claims_for_directory_levels(tmp_path: Path) -> None:
    subject = {**BASE["subject"], "department": {"claim": "department"}}
    directory = {**DIRECTORY, "levels": {"department": {"attribute": "departmentNumber"}}}
    policy = load(tmp_path, directory, subject)
    given = Given({"department": "research"}, frozenset({"department"}), replace=True)
    path = map_subject(policy.subject, {"sub": "alice", "department": "finance"}, given)
    assert path.nodes == (
        Node("org", "acme"),
        Node("department", "research"),
        Node("user", "alice"),
    )
    fill = Given({"department": "research"}, frozenset({"department"}), replace=False)
    path = map_subject(policy.subject, {"sub": "alice", "department": "finance"}, fill)
    assert path.get("department") == "finance"  # fill: the claim wins
    path = map_subject(policy.subject, {"sub": "alice"}, fill)
    assert path.get("department") == "research"  # ... and the directory fills the gap


def test_directory_values_cannot_name_another_node(tmp_path: Path) -> None:
    policy = load(tmp_path, DIRECTORY)
    hostile = Given({"department": "research/team:x", "team": "a}|b@c"},
                    frozenset({"department", "team"}))  # fmt: skip
    path = map_subject(policy.subject, {"sub": "alice"}, hostile)
    assert [n.name for n in path.nodes] == ["acme", "research%2Fteam%3Ax", "a%7D%7Cb%40c", "alice"]
    too_long = Given({"department": "d" * 257}, frozenset({"department", "team"}))
    with pytest.raises(SubjectUnmapped, match="directory's department is longer than 256"):
        map_subject(policy.subject, {"sub": "alice"}, too_long)


def test_a_subject_the_directory_does_not_place(tmp_path: Path) -> None:
    policy = load(tmp_path, DIRECTORY)
    with pytest.raises(SubjectUnmapped, match="the directory names no department for this subject"):
        map_subject(policy.subject, {"sub": "ghost"}, Given({}, frozenset({"department", "team"})))
    # team is skipped when missing: a user in no team group is charged to the department
    path = map_subject(policy.subject, {"sub": "al"},
                       Given({"department": "r"}, frozenset({"department", "team"})))  # fmt: skip
    assert str(path) == "org:acme/department:r/user:al"


def test_an_unknown_key_does_not_suggest_a_password(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        load(tmp_path, {**DIRECTORY, "passwd": "x"})
    assert "directory.passwd: unknown key" in str(err.value)
    assert "password," not in str(err.value) and "password_file" in str(err.value)
