"""Claim values as an attacker would choose them: no value names another node (issue 9, #9).

Properties over arbitrary text (separators, braces, whitespace, control characters,
lone surrogates, non-ASCII): escaping is injective and leaves no separator; two claim
sets that differ in a mapped value never share a node path, nor any ledger key.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.admission import plan_limits
from authz.policy.loader import load_policy, parse_policy
from authz.policy.model import SubjectPath
from authz.policy.names import MAX_NAME_CHARS, RESERVED, escape_name
from authz.policy.periods import PeriodWindows
from authz.policy.subject import SubjectUnmapped, map_subject

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "examples" / "policy.yaml")
WINDOWS = PeriodWindows(POLICY.timezone)
TEAM = re.compile("team-[a-z0-9-]+")  # the example policy's team pattern
NOW = datetime(2026, 3, 4, 12, 30, tzinfo=UTC).timestamp()

# Text an attacker would try: the separators, and anything else Unicode has.
_SEPARATORS = "/:|@{}%* \t\n\r\x00\x7f\u2028\u00a0"
names = st.text(st.sampled_from(_SEPARATORS) | st.characters(), min_size=1, max_size=24)
value = names | st.integers(min_value=0, max_value=10**6)


def _claims(org: Any, dept: Any, team: Any, user: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"org_id": org, "sub": user}
    if dept is not None:
        claims["department"] = dept
    if team is not None:
        claims["groups"] = [f"team-{team}"]
    return claims


claim_sets = st.builds(
    _claims,
    value,
    st.none() | value,
    st.none() | st.text(st.sampled_from("abc-/:|@{}%"), min_size=1, max_size=8),
    value,
)


def _path(claims: dict[str, Any]) -> SubjectPath | None:
    try:
        return map_subject(POLICY.subject, claims)
    except SubjectUnmapped:
        return None


def _keys(path: SubjectPath) -> set[str]:
    return {p.limit.key for p in plan_limits(POLICY, path, "gpt-4o", WINDOWS, NOW)}


@given(names, names)
def test_escaping_is_injective_and_leaves_no_separator(a: str, b: str) -> None:
    ea, eb = escape_name(a), escape_name(b)
    assert (ea == eb) == (a == b)
    assert not (set(ea) & (RESERVED - {"%"}))
    assert ea.isprintable() and not any(ch.isspace() for ch in ea)
    ea.encode("utf-8")  # no lone surrogate left: every Redis client can send it
    assert escape_name(ea) != ea or ea == a  # "%" is escaped too: no double meaning


def test_plain_names_are_unchanged() -> None:
    for name in ("acme", "research", "team-nlp", "batch_report.v2", "ünïcode", "Ωmega"):
        assert escape_name(name) is name


def _mapped(claims: dict[str, Any]) -> tuple[str, ...]:
    """What the example policy reads from ``claims``, as text: org, department (or its
    fallback), team (if the pattern takes it), user."""
    dept = claims.get("department")
    groups = claims.get("groups", [])
    team = next((g[5:] for g in groups if TEAM.fullmatch(g)), "")
    return (str(claims["org_id"]), "unassigned" if dept is None else str(dept), team,
            str(claims["sub"]))  # fmt: skip


@given(claim_sets, claim_sets)
def test_distinct_claims_never_share_a_node_or_a_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    pa, pb = _path(a), _path(b)
    if pa is None or pb is None:
        return
    same = _mapped(a) == _mapped(b)
    assert (pa == pb) == same
    assert (str(pa) == str(pb)) == same
    # A ledger key names one node: a key both paths use is a node both paths share,
    # with the same names all the way down from the org.
    for key in _keys(pa) & _keys(pb):
        _, node, _ = key.split("|")
        depth = node.count("/") + 1
        assert str(SubjectPath(pa.nodes[:depth])) == node == str(SubjectPath(pb.nodes[:depth]))
        assert pa.nodes[:depth] == pb.nodes[:depth]


@given(claim_sets)
def test_a_path_splits_back_into_its_nodes(claims: dict[str, Any]) -> None:
    path = _path(claims)
    if path is None:
        return
    text = str(path)
    parts = [part.split(":") for part in text.split("/")]
    assert [(lv, name) for lv, name in parts] == [(n.level, n.name) for n in path.nodes]
    for key in _keys(path):
        assert key.count("|") == 2
    rid_org = f"{'0' * 32}@{path.org}"
    assert rid_org.count("@") == 1 and not set(path.org) & set("{}/")


def test_a_value_past_the_bound_is_refused_not_cut() -> None:
    ok = {"org_id": "acme", "sub": "u" * MAX_NAME_CHARS}
    assert map_subject(POLICY.subject, ok).get("user") == "u" * MAX_NAME_CHARS
    with pytest.raises(SubjectUnmapped, match="sub claim for user is longer than 256"):
        map_subject(POLICY.subject, {"org_id": "acme", "sub": "u" * (MAX_NAME_CHARS + 1)})


def test_match_patterns_name_the_same_escaped_names() -> None:
    """A budget on ``{department: "r&d / lab"}`` applies to exactly that claim value."""
    data: dict[str, Any] = {
        "version": 1,
        "identity": {"api_keys": []},
        "subject": {"org": {"claim": "org_id"}, "department": {"claim": "department"}},
        "budgets": [
            {"name": "lab", "match": {"department": "r&d / lab"}, "tokens": 10, "period": "day"}
        ],
    }
    data["identity"]["api_keys"] = [{"name": "k", "sha256": "0" * 64, "claims": {"org_id": "a"}}]
    policy = parse_policy(data, "p.yaml")
    lab = map_subject(policy.subject, {"org_id": "a", "department": "r&d / lab"})
    other = map_subject(policy.subject, {"org_id": "a", "department": "r&d %2F lab"})
    assert str(lab) == "org:a/department:r&d%20%2F%20lab"
    assert [b.name for b in policy.budgets_for(lab)] == ["lab"]
    assert policy.budgets_for(other) == ()
