"""Validation of the ``management:`` section (see :mod:`authz.policy.management`).

Same rules as :mod:`authz.policy.loader`: unknown keys are errors, every error names
``file:path`` and the bad value. The admin key file is read here, at load time, so a
missing or malformed file fails the load (or the reload, keeping the last good policy)
instead of locking the operator out later.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from authz.policy.loader_admission import Reader
from authz.policy.management import ROLES, ManagementPolicy, RoleRule

__all__ = ["parse_management"]

_SCOPES = ("org", "department", "team")
_SHARE = re.compile(r"^(\d+(?:\.\d+)?)%$")
_KEY_LINE = re.compile(r"^([A-Za-z0-9_.:@-]+)\s+([0-9a-f]{64})$")


def _rule(r: Reader, raw: Any, p: str) -> RoleRule:
    m = r.mapping(raw, p, {"role", "claim", "value", "scope", "max_tokens"},
                  {"role", "claim", "value", "scope"})  # fmt: skip
    role = r.choice(m["role"], f"{p}.role", ROLES)
    value = m["value"]
    if isinstance(value, list | dict) or value is None or isinstance(value, bool):
        r.fail(f"{p}.value", "must be the claim's value (a string or number)", value)
    share: float | None = None
    units: int | None = None
    if "max_tokens" in m:
        if role not in ("manager", "approver"):
            r.fail(f"{p}.max_tokens", f"applies to managers and approvers, not {role}s",
                   m["max_tokens"])  # fmt: skip
        raw_cap = m["max_tokens"]
        if isinstance(raw_cap, str):
            found = _SHARE.match(raw_cap.strip())
            if found is None or float(found.group(1)) > 1000:
                r.fail(f"{p}.max_tokens", "must be a percentage like '50%' or a whole number",
                       raw_cap)  # fmt: skip
            share = float(found.group(1)) / 100
        else:
            units = r.integer(raw_cap, f"{p}.max_tokens", 0)
    elif role in ("manager", "approver"):
        r.fail(f"{p}.max_tokens", f"is required for a {role} (e.g. '10%' or 50000)")
    return RoleRule(
        role=role,  # type: ignore[arg-type]
        claim=r.string(m["claim"], f"{p}.claim"),
        value=str(value),
        scope=r.choice(m["scope"], f"{p}.scope", _SCOPES),
        max_share=share,
        max_units=units,
    )


def _admin_keys(r: Reader, raw: Any, base: Path) -> tuple[tuple[str, str], ...]:
    p = "management.admin_keys_file"
    path = base / r.string(raw, p)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        r.fail(p, f"cannot be read: {getattr(exc, 'strerror', None) or exc}", str(path))
    keys: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        found = _KEY_LINE.match(line)
        if found is None:
            # Never echo the line: it may be a key pasted instead of its digest.
            r.fail(p, f"line {n} of {path} must be '<name> <sha256 hex of the key>'"
                   " (authz hash-key prints the digest)")  # fmt: skip
        keys.append((found.group(2), found.group(1)))
    digests = [d for d, _ in keys]
    if len(set(digests)) != len(digests):
        r.fail(p, f"{path} lists the same key twice")
    return tuple(keys)


def parse_management(r: Reader, raw: Any, base: Path) -> ManagementPolicy:
    m = r.mapping(raw, "management", {"roles", "admin_keys_file", "escalate_after_s"})
    roles = r.items(m.get("roles"), "management.roles", lambda v, p: _rule(r, v, p))
    keys = _admin_keys(r, m["admin_keys_file"], base) if "admin_keys_file" in m else ()
    escalate = r.number(m.get("escalate_after_s", 86400), "management.escalate_after_s", 1)
    return ManagementPolicy(roles=roles, admin_keys=keys, escalate_after_s=escalate)
