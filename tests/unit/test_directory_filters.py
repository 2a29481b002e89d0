"""RFC 4515 escaping of hostile subject values, and entries -> level names."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.directory.filters import escape_filter_value, fill, level_names
from authz.directory.ldap import MATCH_EQUAL, parse_filter
from authz.policy.directory import LevelSource

pytestmark = pytest.mark.unit
TEMPLATE = "(&(objectClass=inetOrgPerson)(uid={subject}))"


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("alice", "alice"),
        ("*", "\\2a"),
        ("alice)(uid=*", "alice\\29\\28uid=\\2a"),
        ("a\\b", "a\\5cb"),
        ("nul\0byte", "nul\\00byte"),
        ("*)(|(objectClass=*", "\\2a\\29\\28|\\28objectClass=\\2a"),
        ("jürgen", "jürgen"),  # UTF-8 is legal in a filter value
    ],
)
def test_escape_filter_value(value: str, escaped: str) -> None:
    assert escape_filter_value(value) == escaped


def test_a_value_is_never_read_as_a_slot() -> None:
    assert fill(TEMPLATE, "{subject}", "{subject}") == TEMPLATE.replace("{subject}", "{subject}")
    assert fill("(uid={subject})", "{subject}", "x{subject}y") == "(uid=x{subject}y)"


def _unescape(value: bytes | str) -> bytes:
    """What the server compares: RFC 4515 \\XX escapes turned back into bytes."""
    raw = value.encode() if isinstance(value, str) else value
    return re.sub(rb"\\([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)


def _equalities(node: object) -> list[tuple[str, bytes]]:
    out = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n.tag == MATCH_EQUAL:  # type: ignore[attr-defined]
            assertion = n.assertion  # type: ignore[attr-defined]
            out.append((assertion["attr"], _unescape(assertion["value"])))
        stack.extend(n.elements)  # type: ignore[attr-defined]
    return out


@given(st.text(alphabet=st.sampled_from("ab*()\\\0=|&!~<>é"), max_size=30))
def test_any_value_stays_one_literal_assertion(value: str) -> None:
    """Whatever a claim says, the filter keeps its shape: two equality clauses, and
    the uid clause asserts exactly the claim's bytes (no wildcard, no extra clause).
    (Spaces are left out: ldap3 trims a value's outer spaces, as uid matching does.)"""
    flt = fill(TEMPLATE, "{subject}", value)
    root = parse_filter(flt, None, False, True, None, False)
    found = sorted(_equalities(root))
    assert [attr for attr, _ in found] == ["objectClass", "uid"]
    uid = dict(found)["uid"]
    assert uid == value.encode("utf-8"), (flt, uid)


def test_without_escaping_the_same_value_changes_the_filter() -> None:
    """The guard the test above relies on: a raw value does change the filter."""
    raw = TEMPLATE.replace("{subject}", "*)(uid=admin")
    root = parse_filter(raw, None, False, True, None, False)
    assert dict(_equalities(root))["uid"] == b"admin"  # another user's entry
    escaped = parse_filter(
        fill(TEMPLATE, "{subject}", "*)(uid=admin"), None, False, True, None, False
    )
    assert dict(_equalities(escaped))["uid"] == b"*)(uid=admin"


SOURCES = (
    LevelSource("department", attribute="departmentNumber"),
    LevelSource("team", group=True, pattern=re.compile(r"^cn=team-(?P<name>[^,]+),ou=groups,")),
)


def test_level_names_from_attribute_and_groups() -> None:
    attrs = {"DepartmentNumber": ["research", "other"]}  # attribute names are case-blind
    groups = ["cn=admins,ou=groups,dc=x", "cn=team-nlp,ou=groups,dc=x"]
    assert level_names(SOURCES, attrs, groups) == {"department": "research", "team": "nlp"}


def test_level_names_first_group_in_sorted_order() -> None:
    groups = ["cn=team-zeta,ou=groups,dc=x", "cn=team-alpha,ou=groups,dc=x"]
    assert level_names(SOURCES, {}, groups) == {"team": "alpha"}
    assert level_names(SOURCES, {}, list(reversed(groups))) == {"team": "alpha"}


def test_level_names_absent_when_nothing_matches() -> None:
    assert level_names(SOURCES, {"departmentNumber": []}, ["cn=admins,ou=groups,dc=x"]) == {}


def test_attribute_pattern_first_group() -> None:
    src = (LevelSource("department", attribute="ou", pattern=re.compile(r"^dept-(\w+)$")),)
    assert level_names(src, {"ou": ["x", "dept-sales"]}, []) == {"department": "sales"}
