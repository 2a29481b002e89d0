"""Validation of the ``directory:`` section: the org chart from LDAP / Active Directory.

Same rules as :mod:`authz.policy.loader` (whose reader ``r`` is passed in): unknown
keys are errors, every error names ``file:path`` and the bad value.

    directory:
      url: ldaps://ldap.example.com            # or ldap:// (with start_tls: true)
      bind_dn: cn=authz,ou=services,dc=example,dc=com
      password_file: /run/secrets/ldap-password   # never the password itself
      base_dn: ou=people,dc=example,dc=com
      user_filter: "(&(objectClass=inetOrgPerson)(uid={subject}))"
      subject_claim: sub
      groups: {attribute: memberOf}            # or {base_dn: ..., filter: "(member={dn})"}
      levels:
        department: {attribute: departmentNumber}
        team: {group: "^cn=team-(?P<name>[^,]+),ou=groups,"}
      mode: replace                            # or fill: claims first
      cache_s: 300
      negative_cache_s: 60
      on_down: last_known                      # deny, or {fallback: {department: unassigned}}

A level the ``subject`` section has no rule for gets one reading only the directory,
whose ``missing`` (deny, skip or ``{fallback: name}``) the directory's level may set.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from authz.directory.filters import fill
from authz.directory.ldap import LDAPException, parse_filter
from authz.policy.directory import (
    DN_SLOT,
    SUBJECT_SLOT,
    DirectorySettings,
    GroupSource,
    LevelSource,
    OnDown,
)
from authz.policy.loader_observability import Reader
from authz.policy.model import HIERARCHY, LevelRule, SubjectRules

__all__ = ["parse_directory"]

LEVELS = ("department", "team")
_URL = r"ldaps?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/?|ldaps?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?/?"
_KEYS = {
    "url", "start_tls", "ca_file", "bind_dn", "password_file", "base_dn", "user_filter",
    "subject_claim", "groups", "levels", "mode", "cache_s", "negative_cache_s",
    "refresh_ahead", "timeout_s", "retry_s", "max_entries", "workers", "on_down",
}  # fmt: skip


def _file(r: Reader, value: Any, path: str, base: Path) -> str:
    file = base / r.string(value, path)
    try:
        found = file.is_file()
    except OSError as exc:
        r.fail(path, f"cannot be read: {exc.strerror}", str(file))
    if not found:
        r.fail(path, "file not found", str(file))
    return str(file)


def _filter(r: Reader, value: Any, path: str, slot: str) -> str:
    text = r.string(value, path)
    if slot not in text:
        r.fail(path, f"must contain {slot}, where the escaped value goes", text)
    try:
        parse_filter(fill(text, slot, "x"), None, False, True, None, False)
    except (LDAPException, IndexError, ValueError):
        r.fail(path, "is not a valid LDAP filter (RFC 4515)", text)
    return text


def _pattern(r: Reader, value: Any, path: str) -> re.Pattern[str]:
    text = r.string(value, path)
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError) as exc:
        r.fail(path, f"is not a valid regular expression: {exc}", text)


def _levels(
    r: Reader, raw: Any, has_groups: bool
) -> tuple[tuple[LevelSource, ...], dict[str, Any]]:
    m = r.mapping(raw, "directory.levels", set(LEVELS))
    if not m:
        r.fail("directory.levels", "must name at least one of department, team", raw)
    sources, missing = [], {}
    for level in LEVELS:
        if level not in m:
            continue
        p = f"directory.levels.{level}"
        lm = r.mapping(m[level], p, {"attribute", "group", "pattern", "missing"})
        if ("attribute" in lm) == ("group" in lm):
            r.fail(p, "needs exactly one of attribute or group")
        if "group" in lm:
            if not has_groups:
                r.fail(f"{p}.group", "needs a directory.groups section (where groups are found)")
            if "pattern" in lm:
                r.fail(f"{p}.pattern", "a group level's pattern is its group value")
            src = LevelSource(level, group=True, pattern=_pattern(r, lm["group"], f"{p}.group"))
        else:
            pattern = _pattern(r, lm["pattern"], f"{p}.pattern") if "pattern" in lm else None
            attr = r.string(lm["attribute"], f"{p}.attribute", r"[A-Za-z][A-Za-z0-9-]*")
            src = LevelSource(level, attribute=attr, pattern=pattern)
        sources.append(src)
        if "missing" in lm:
            missing[level] = lm["missing"]
    return tuple(sources), missing


def _groups(r: Reader, raw: Any) -> GroupSource:
    p = "directory.groups"
    m = r.mapping(raw, p, {"attribute", "base_dn", "filter"})
    if ("attribute" in m) == ("base_dn" in m):
        r.fail(p, "needs exactly one of attribute (e.g. memberOf) or base_dn (a group search)")
    if "attribute" in m:
        if "filter" in m:
            r.fail(f"{p}.filter", "applies only to a group search (base_dn)")
        return GroupSource(attribute=r.string(m["attribute"], f"{p}.attribute",
                                              r"[A-Za-z][A-Za-z0-9-]*"))  # fmt: skip
    return GroupSource(
        attribute=None,
        base_dn=r.string(m["base_dn"], f"{p}.base_dn"),
        filter=_filter(r, m.get("filter", "(member={dn})"), f"{p}.filter", DN_SLOT),
    )


def _on_down(r: Reader, raw: Any, levels: tuple[str, ...]) -> OnDown:
    p = "directory.on_down"
    if isinstance(raw, dict):
        m = r.mapping(raw, p, {"fallback"}, {"fallback"})
        fm = r.mapping(m["fallback"], f"{p}.fallback", set(levels))
        if not fm:
            r.fail(f"{p}.fallback", f"must name a node for one of {', '.join(levels)}", raw)
        names = tuple((lv, r.string(fm[lv], f"{p}.fallback.{lv}")) for lv in levels if lv in fm)
        return OnDown("fallback", names)
    mode = r.choice(raw, p, ("last_known", "deny"))
    return OnDown(cast(Any, mode))


def _rule(r: Reader, level: str, raw: Any) -> LevelRule:
    p = f"directory.levels.{level}.missing"
    if isinstance(raw, dict):
        m = r.mapping(raw, p, {"fallback"}, {"fallback"})
        return LevelRule(level, (), missing="fallback", fallback=r.string(m["fallback"], p))
    return LevelRule(level, (), missing=cast(Any, r.choice(raw, p, ("deny", "skip"))))


def parse_directory(
    r: Reader, raw: Any, base: Path, subject: SubjectRules
) -> tuple[DirectorySettings, SubjectRules]:
    """The directory's settings, and the subject rules with a rule for every level the
    directory maps (those the subject section lacks read only the directory)."""
    p = "directory"
    if isinstance(raw, dict) and "password" in raw:  # never echoed, never "allowed"
        r.fail(f"{p}.password", "is never written in the policy: use password_file")
    m = r.mapping(raw, p, _KEYS, {"url", "base_dn", "user_filter", "levels"})
    url = r.string(m["url"], f"{p}.url")
    if not re.fullmatch(_URL, url):
        r.fail(f"{p}.url", "must be ldap://host[:port] or ldaps://host[:port]", url)
    start_tls = r.boolean(m.get("start_tls", False), f"{p}.start_tls")
    if start_tls and url.startswith("ldaps:"):
        r.fail(f"{p}.start_tls", "ldaps:// is TLS already; StartTLS is for ldap://", start_tls)
    if ("bind_dn" in m) != ("password_file" in m):
        r.fail(p, "bind_dn and password_file go together (neither: an anonymous bind)")
    groups = _groups(r, m["groups"]) if "groups" in m else None
    sources, missing = _levels(r, m["levels"], groups is not None)
    names = tuple(s.level for s in sources)
    have = {rule.level for rule in subject.levels}
    for level, value in missing.items():
        if level in have:
            why = f"subject.{level} already says what happens when it is missing"
            r.fail(f"{p}.levels.{level}.missing", why, value)
    added = [_rule(r, lv, missing.get(lv, "deny")) for lv in names if lv not in have]
    rules = sorted([*subject.levels, *added], key=lambda rule: HIERARCHY.index(rule.level))
    timeout = r.number(m.get("timeout_s", 2), f"{p}.timeout_s", 0.05)
    password_file = None
    if "password_file" in m:
        password_file = _file(r, m["password_file"], f"{p}.password_file", base)
    settings = DirectorySettings(
        url=url,
        base_dn=r.string(m["base_dn"], f"{p}.base_dn"),
        user_filter=_filter(r, m["user_filter"], f"{p}.user_filter", SUBJECT_SLOT),
        levels=sources,
        bind_dn=r.string(m["bind_dn"], f"{p}.bind_dn") if "bind_dn" in m else None,
        password_file=password_file,
        start_tls=start_tls,
        ca_file=_file(r, m["ca_file"], f"{p}.ca_file", base) if "ca_file" in m else None,
        subject_claim=r.string(m.get("subject_claim", "sub"), f"{p}.subject_claim"),
        groups=groups,
        mode=cast(Any, r.choice(m.get("mode", "replace"), f"{p}.mode", ("replace", "fill"))),
        cache_s=r.number(m.get("cache_s", 300), f"{p}.cache_s", 1),
        negative_cache_s=r.number(m.get("negative_cache_s", 60), f"{p}.negative_cache_s"),
        refresh_ahead=r.number(m.get("refresh_ahead", 0.2), f"{p}.refresh_ahead"),
        timeout_s=timeout,
        retry_s=r.number(m.get("retry_s", 5), f"{p}.retry_s"),
        max_entries=r.integer(m.get("max_entries", 100_000), f"{p}.max_entries", 1),
        workers=r.integer(m.get("workers", 4), f"{p}.workers", 1),
        on_down=_on_down(r, m.get("on_down", "last_known"), names),
    )
    if settings.refresh_ahead >= 1:
        r.fail(f"{p}.refresh_ahead", "must be below 1 (a share of cache_s)",
               settings.refresh_ahead)  # fmt: skip
    if settings.workers > 64:
        r.fail(f"{p}.workers", "must be at most 64", settings.workers)
    return settings, replace(subject, levels=tuple(rules))
