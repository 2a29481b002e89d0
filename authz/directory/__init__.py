"""The directory as the org chart: a subject's department and team from LDAP / AD.

Optional (policy section ``directory``, validated by
:mod:`authz.policy.loader_directory`). The enforcer asks :func:`given_for` before it
maps claims to a path; :func:`directory_nodes` is the same answer as path nodes, for
the management API (which lists the nodes "seen from the directory").

    directory = Directory(policy.directory, clock)     # one per policy's settings
    given = await given_for(directory, policy.subject, claims)  # for map_subject
    nodes = await directory_nodes(directory, "alice")  # (Node("department", "research"),
                                                       #  Node("team", "nlp"))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.directory.cache import Directory
from authz.directory.client import DirectoryUnavailable
from authz.directory.stats import DirectoryStats
from authz.policy.directory import DirectorySettings
from authz.policy.model import HIERARCHY, Node, SubjectRules
from authz.policy.names import MAX_NAME_CHARS, escape_name
from authz.policy.subject import Given, claimed_levels

__all__ = [
    "Directory",
    "DirectorySettings",
    "DirectoryStats",
    "DirectoryUnavailable",
    "directory_nodes",
    "given_for",
    "subject_of",
]


def subject_of(settings: DirectorySettings, claims: Mapping[str, Any]) -> str | None:
    """The value looked up: the ``subject_claim`` (a string or number), or None. A value
    no directory could hold (empty, longer than a node name may be) is never sent."""
    value = claims.get(settings.subject_claim)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    if not text or len(text) > MAX_NAME_CHARS:
        return None
    return text


async def given_for(directory: Directory, rules: SubjectRules, claims: Mapping[str, Any]) -> Given:
    """What the directory says about the caller with these claims, for
    :func:`authz.policy.subject.map_subject`. In ``fill`` mode, claims that name every
    level the directory maps leave it unasked (and its outages irrelevant to them).
    Raises :class:`DirectoryUnavailable`."""
    s = directory.settings
    levels, replace = frozenset(s.level_names), s.mode == "replace"
    subject = subject_of(s, claims)
    if subject is None or (not replace and levels <= claimed_levels(rules, claims)):
        return Given({}, levels, replace)
    return Given(await directory.levels(subject), levels, replace)


async def directory_nodes(directory: Directory, subject: str) -> tuple[Node, ...]:
    """The nodes above the leaf that the directory gives ``subject`` (e.g. a user id),
    escaped as node names are, in hierarchy order; () if it has no entry. Served from
    the same cache as checks. Raises :class:`DirectoryUnavailable`."""
    names = await directory.levels(subject)
    return tuple(
        Node(level, escape_name(names[level]))
        for level in HIERARCHY
        if names.get(level) and len(names[level]) <= MAX_NAME_CHARS
    )
