"""The ``directory`` section of the policy as frozen values (built by
:mod:`authz.policy.loader_directory`; used by :mod:`authz.directory`).

A directory (LDAP, Active Directory) can name the department and team of a subject in
place of claims (``mode: replace``) or where the claims say nothing (``mode: fill``).
Nothing here talks to a server; :mod:`authz.directory.client` does, and
:mod:`authz.directory.cache` decides when.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DirectorySettings", "GroupSource", "LevelSource", "OnDown"]

SUBJECT_SLOT = "{subject}"  # where the escaped subject goes in user_filter
DN_SLOT = "{dn}"  # where the escaped user DN goes in groups.filter


@dataclass(frozen=True, slots=True)
class LevelSource:
    """Where one level's name is read: an attribute of the user's entry, or the DNs of
    the user's groups, matched by ``pattern`` (its ``name`` group, first group, or the
    whole match is the name)."""

    level: str
    attribute: str | None = None  # e.g. "department", "departmentNumber"
    group: bool = False  # read from the user's groups (groups section)
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class GroupSource:
    """How a user's groups are found: an attribute of the entry (``memberOf`` in AD and
    OpenLDAP's memberof overlay), or a search for groups naming the user's DN."""

    attribute: str | None = "memberOf"
    base_dn: str | None = None
    filter: str = "(member={dn})"


@dataclass(frozen=True, slots=True)
class OnDown:
    """What a check gets when the directory cannot answer for a subject.

    ``last_known``: the last answer seen, however old (none seen: as ``deny``);
    ``fallback``: the fixed names in ``fallback`` (levels not named: as if the
    directory gave nothing); ``deny``: 503 ``directory_unavailable``."""

    mode: Literal["last_known", "fallback", "deny"] = "last_known"
    fallback: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DirectorySettings:
    url: str  # ldap://host[:port] or ldaps://host[:port]
    base_dn: str
    user_filter: str  # with {subject}, e.g. (&(objectClass=person)(uid={subject}))
    levels: tuple[LevelSource, ...]
    bind_dn: str | None = None
    password_file: str | None = None  # read at each bind: rotation needs no reload
    start_tls: bool = False
    ca_file: str | None = None  # trust for ldaps:// and StartTLS (default: the system's)
    subject_claim: str = "sub"
    groups: GroupSource | None = None
    mode: Literal["replace", "fill"] = "replace"
    cache_s: float = 300.0
    negative_cache_s: float = 60.0
    refresh_ahead: float = 0.2  # an active subject is refreshed in the last 20% of cache_s
    timeout_s: float = 2.0  # one lookup: connect, bind and searches
    retry_s: float = 5.0  # after a failure, lookups fail fast this long (one probe after)
    max_entries: int = 100_000
    workers: int = 4  # threads running the synchronous LDAP client
    on_down: OnDown = field(default_factory=OnDown)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(s.level for s in self.levels)
