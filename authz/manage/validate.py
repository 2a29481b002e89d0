"""An allocation from the API (or the CLI), validated as the policy file is.

The policy loader's own reader does the checking (:data:`authz.policy.loader.Reader`),
so an allocation's ``tokens`` obey the same bounds as a budget's ``tokens`` and errors
read the same way: ``allocation:tokens: must be at most 9007199254740991 (2**53 - 1)
(got ...)``. The API answers such a :class:`PolicyError` with 422 naming the field.
Everything is checked against the live policy: the budget must exist and count on
the node, because an allocation for a counter nobody reads would do nothing silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from authz.errors import PolicyError
from authz.manage.model import KINDS, Allocation, NodeError, parse_node
from authz.policy.loader import Reader
from authz.policy.model import Policy

__all__ = ["MAX_REASON_CHARS", "SOURCE", "parse_allocation"]

SOURCE = "allocation"  # the "file" part of every error
MAX_REASON_CHARS = 1000
_FIELDS = {"kind", "node", "budget", "tokens", "starts_at", "expires_at", "reason"}


def parse_allocation(
    raw: Mapping[str, Any], policy: Policy, now: float, created_by: str
) -> Allocation:
    """A new :class:`Allocation`, or :class:`PolicyError` naming the field."""
    r = Reader(SOURCE)
    m = r.mapping(dict(raw), "", _FIELDS, {"kind", "node", "reason"})
    m = {k: v for k, v in m.items() if v is not None}  # JSON null: the field is absent
    kind = r.choice(m["kind"], "kind", KINDS)
    node = r.string(m["node"], "node")
    try:
        path = parse_node(node)
    except NodeError as exc:
        r.fail("node", str(exc), node)
    reason = r.string(m["reason"], "reason")
    if len(reason) > MAX_REASON_CHARS:
        r.fail("reason", f"must be at most {MAX_REASON_CHARS} characters", reason)
    starts = r.number(m["starts_at"], "starts_at") if "starts_at" in m else now
    expires = r.number(m["expires_at"], "expires_at") if "expires_at" in m else None
    if expires is not None and expires <= max(now, starts):
        r.fail("expires_at", "must be later than now and than starts_at", expires)
    budget: str | None = None
    tokens = 0
    if kind == "freeze":
        for extra in ("budget", "tokens"):
            if extra in m:
                r.fail(extra, "a freeze stops the whole node: it takes no budget or tokens")
    else:
        if "budget" not in m:
            r.fail("budget", f"is required for an {kind} allocation")
        budget = r.string(m["budget"], "budget")
        if "tokens" not in m:
            r.fail("tokens", f"is required for an {kind} allocation")
        raw_tokens = m["tokens"]
        if kind == "emergency":
            tokens = r.integer(raw_tokens, "tokens", 1)
            if expires is None:
                r.fail("expires_at", "is required for an emergency allocation")
        else:
            negative = isinstance(raw_tokens, int) and not isinstance(raw_tokens, bool) and (
                raw_tokens < 0)  # fmt: skip
            tokens = r.integer(-raw_tokens if negative else raw_tokens, "tokens", 1)
            tokens = -tokens if negative else tokens
        leaf = path.leaf
        assert leaf is not None
        found = next((b for b in policy.budgets if b.name == budget), None)
        if found is None:
            r.fail("budget", "no budget of that name in the policy", budget)
        if found.level != leaf.level or found not in policy.budgets_for(path):
            r.fail("budget", f"does not count on {node} (it counts on its {found.level}"
                   " nodes that its match names)", budget)  # fmt: skip
    return Allocation(
        id=os.urandom(8).hex(),
        kind=kind,  # type: ignore[arg-type]
        node=node,
        budget=budget,
        tokens=tokens,
        starts_at=starts,
        expires_at=expires,
        reason=reason,
        created_by=created_by,
        created_at=now,
    )


def field_of(error: PolicyError) -> str:
    """The request field an error names (``tokens`` of ``allocation:tokens``)."""
    return error.path.split(".")[0].split("[")[0] or "body"
