"""Claims -> subject path (org -> department -> team -> user or app)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.policy.model import LevelRule, Node, SubjectPath, SubjectRules

__all__ = ["SubjectUnmapped", "map_subject"]


class SubjectUnmapped(Exception):
    """The claims do not name a place in the organisation (a denial, not a fault)."""

    def __init__(self, level: str, message: str) -> None:
        self.level = level
        super().__init__(message)


def _pick(value: Any, rule: LevelRule) -> str | None:
    # A claim may be a string or a list (e.g. `groups`); with a pattern, the first
    # value that matches wins and its first group (or the whole match) is the name.
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, str | int):
            continue
        text = str(item)
        if not text:
            continue
        if rule.pattern is None:
            return text
        m = rule.pattern.search(text)
        if m is not None:
            if "name" in m.groupdict():
                return m.group("name")
            return m.group(1) if m.groups() else m.group(0)
    return None


def _resolve(rule: LevelRule, claims: Mapping[str, Any]) -> str | None:
    for want_claim, want_value in rule.require:
        if str(claims.get(want_claim, "")) != want_value:
            return None
    for claim in rule.claims:
        if claim in claims:
            name = _pick(claims[claim], rule)
            if name is not None:
                return name
    return None


def map_subject(rules: SubjectRules, claims: Mapping[str, Any]) -> SubjectPath:
    """Map verified claims to a path, or raise :class:`SubjectUnmapped`."""
    nodes: list[Node] = []
    for rule in rules.levels:
        name = _resolve(rule, claims)
        if name is None:
            if rule.missing == "skip":
                continue
            if rule.missing == "fallback" and rule.fallback is not None:
                name = rule.fallback
            else:
                wanted = " or ".join(rule.claims)
                raise SubjectUnmapped(rule.level, f"token has no {wanted} claim for {rule.level}")
        nodes.append(Node(rule.level, name))
    for rule in rules.leaf:
        name = _resolve(rule, claims)
        if name is not None:
            nodes.append(Node(rule.level, name))
            break
    else:
        if rules.leaf and rules.leaf_required:
            wanted = ", ".join(c for r in rules.leaf for c in r.claims)
            raise SubjectUnmapped("leaf", f"token names no user or app (looked for {wanted})")
    return SubjectPath(tuple(nodes))
