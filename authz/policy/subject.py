"""Claims -> subject path (org -> department -> team -> user or app).

Every name taken from a claim (or a policy fallback) goes through
:func:`authz.policy.names.escape_name` here, once, so no claim value can contain a
separator of paths, ledger keys, reservation ids or Redis hash tags and so name another
node, counter or org (see that module). A value longer than
:data:`~authz.policy.names.MAX_NAME_CHARS` is refused: :class:`SubjectUnmapped`, which the
enforcer answers with 403 ``subject_unmapped``. An empty name (``""``, or a pattern whose
group matched nothing) counts as no value: the next one, or the level's ``missing`` rule.

A directory (:mod:`authz.directory`) may name levels too (:class:`Given`): its names go
through the same length bound and escaping, so a directory value can no more name
another node than a claim can.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz.policy.model import LevelRule, Node, SubjectPath, SubjectRules
from authz.policy.names import MAX_NAME_CHARS, escape_name

__all__ = ["Given", "SubjectUnmapped", "claimed_levels", "map_subject"]


class SubjectUnmapped(Exception):
    """The claims do not name a place in the organisation (a denial, not a fault)."""

    def __init__(self, level: str, message: str) -> None:
        self.level = level
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Given:
    """Names a directory gave (raw, level -> name) for the ``levels`` it maps; with
    ``replace`` they are the only source of those levels, else claims come first."""

    names: Mapping[str, str]
    levels: frozenset[str]
    replace: bool = True


def _given(level: str, given: Given) -> str | None:
    name = given.names.get(level)
    if not name:
        return None
    if len(name) > MAX_NAME_CHARS:
        raise SubjectUnmapped(
            level, f"the directory's {level} is longer than {MAX_NAME_CHARS} characters"
        )
    return escape_name(name)


def _pick(value: Any, rule: LevelRule, claim: str) -> str | None:
    # A claim may be a string or a list (e.g. `groups`); with a pattern, the first
    # value that matches wins and its first group (or the whole match) is the name.
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, str | int):
            continue
        text = item if isinstance(item, str) else str(item)
        name: str | None = text
        if rule.pattern is not None:
            m = rule.pattern.search(text)
            if m is None:
                continue
            if "name" in m.groupdict():
                name = m.group("name")
            else:
                name = m.group(1) if m.groups() else m.group(0)
        if not name:
            continue
        if len(name) > MAX_NAME_CHARS:
            raise SubjectUnmapped(
                rule.level,
                f"the {claim} claim for {rule.level} is longer than {MAX_NAME_CHARS}"
                f" characters ({len(name)})",
            )
        return escape_name(name)
    return None


def _resolve(rule: LevelRule, claims: Mapping[str, Any]) -> str | None:
    for want_claim, want_value in rule.require:
        if str(claims.get(want_claim, "")) != want_value:
            return None
    for claim in rule.claims:
        if claim in claims:
            name = _pick(claims[claim], rule, claim)
            if name is not None:
                return name
    return None


def claimed_levels(rules: SubjectRules, claims: Mapping[str, Any]) -> frozenset[str]:
    """The levels above the leaf that the claims name (a directory in ``fill`` mode
    need not be asked for them)."""
    return frozenset(r.level for r in rules.levels if _resolve(r, claims) is not None)


def map_subject(
    rules: SubjectRules, claims: Mapping[str, Any], given: Given | None = None
) -> SubjectPath:
    """Map verified claims (and what a directory gave) to a path of escaped names, or
    raise :class:`SubjectUnmapped`."""
    nodes: list[Node] = []
    for rule in rules.levels:
        mapped = given is not None and rule.level in given.levels
        if mapped and given is not None and given.replace:
            name = _given(rule.level, given)
        else:
            name = _resolve(rule, claims)
            if name is None and mapped and given is not None:
                name = _given(rule.level, given)
        if name is None:
            if rule.missing == "skip":
                continue
            if rule.missing == "fallback" and rule.fallback is not None:
                name = escape_name(rule.fallback)
            else:
                raise SubjectUnmapped(rule.level, _missing(rule, mapped, given))
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


def _missing(rule: LevelRule, mapped: bool, given: Given | None) -> str:
    wanted = " or ".join(rule.claims)
    claim = f"token has no {wanted} claim for {rule.level}"
    if not mapped:
        return claim
    directory = f"the directory names no {rule.level} for this subject"
    only = not wanted or (given is not None and given.replace)
    return directory if only else f"{claim} and {directory}"
