"""Validation of the ``access`` section: model allow and deny lists per node (issue 16).

::

    access:
      - match: {org: acme}
        models: {allow: ["gpt-4o*", "claude-*"]}
      - match: {department: research}
        models: {allow: ["gpt-4o-mini*"], deny: ["*-preview"]}

Semantics in :mod:`authz.policy.access`. Errors read like the loader's:
``file:access[1].models.allow[0]: must be a non-empty string (got '')``.
"""

from __future__ import annotations

from typing import Any

from authz.policy.access import AccessRule, ModelAccess
from authz.policy.loader_admission import Reader, parse_match

__all__ = ["parse_access"]

_PATTERN = r"[^\s]+"  # shell-style: * ? [..]; no spaces, which no model name has


def parse_access(r: Reader, raw: Any) -> ModelAccess:
    def entry(v: Any, p: str) -> AccessRule:
        m = r.mapping(v, p, {"match", "models"}, {"match", "models"})
        pairs = parse_match(r, m["match"], f"{p}.match")
        lists = r.mapping(m["models"], f"{p}.models", {"allow", "deny"})
        if not lists:
            r.fail(f"{p}.models", "needs allow, deny or both")
        allow, deny = (
            tuple(_pattern(r, x, f"{p}.models.{k}[{i}]") for i, x in enumerate(_list(r, m, k, p)))
            for k in ("allow", "deny")
        )
        return AccessRule(p, pairs, pairs[-1][0], allow, deny)

    return ModelAccess(r.items(raw, "access", entry))


def _list(r: Reader, entry: Any, key: str, p: str) -> list[Any]:
    value = entry["models"].get(key)
    if value is None and key not in entry["models"]:
        return []
    if not isinstance(value, list) or not value:
        r.fail(f"{p}.models.{key}", "must be a non-empty list of model patterns", value)
    return value


def _pattern(r: Reader, value: Any, p: str) -> str:
    if not isinstance(value, str) or not value:
        r.fail(p, "must be a non-empty string", value)
    return r.string(value, p, _PATTERN)
