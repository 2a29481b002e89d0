"""Requests for more quota, and who may approve them when (the authority matrix).

A caller asks for ``tokens`` more on a budget of a node on its own path (a user for
its team or department, a manager within its subtree), with a reason. The request
waits at the deepest org, department or team node of that path; each
``management.requests.escalate_after_s`` without a decision moves it one level up.
Whoever holds a manager, approver or admin grant covering the node it waits at, with
a cap (``max_tokens``) that leaves room for it, may approve: a team lead's 10% at the
team, a department head's 50% at the department, finance above. Once escalated, the
levels below can no longer act on it. Approved, it becomes an ``adjust`` allocation
whose id is derived from the request's, so two approvals racing make one allocation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from authz.manage.model import Allocation, parse_node
from authz.policy.model import HIERARCHY

__all__ = ["QuotaRequest", "Status", "allocation_for", "waiting_at"]

Status = Literal["pending", "approved", "rejected"]


@dataclass(frozen=True, slots=True)
class QuotaRequest:
    id: str
    node: str
    budget: str
    tokens: int
    expires_at: float | None
    reason: str
    requested_by: str
    created_at: float
    status: Status = "pending"
    decided_by: str | None = None
    decided_at: float | None = None
    note: str = ""
    allocation_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> QuotaRequest:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    def decided(self, status: Status, by: str, at: float, note: str,
                allocation_id: str | None = None) -> QuotaRequest:  # fmt: skip
        return replace(self, status=status, decided_by=by, decided_at=at, note=note,
                       allocation_id=allocation_id)  # fmt: skip


def _levels(node: str) -> list[str]:
    """The org, department and team nodes above (or at) ``node``, deepest first."""
    keys, out = "", []
    for n in parse_node(node).nodes:
        keys = f"{keys}/{n.level}:{n.name}" if keys else f"{n.level}:{n.name}"
        if n.level in HIERARCHY:
            out.append(keys)
    return out[::-1]


def waiting_at(request: QuotaRequest, now: float, escalate_after_s: float) -> str:
    """The node whose approvers may act on the request now (it escalates with time)."""
    levels = _levels(request.node)
    steps = int(max(0.0, now - request.created_at) // escalate_after_s) if escalate_after_s else 0
    return levels[min(steps, len(levels) - 1)]


def allocation_for(request: QuotaRequest, approver: str, now: float) -> Allocation:
    return Allocation(
        id=f"req-{request.id}",
        kind="adjust",
        node=request.node,
        budget=request.budget,
        tokens=request.tokens,
        starts_at=now,
        expires_at=request.expires_at,
        reason=f"request {request.id} by {request.requested_by}: {request.reason}",
        created_by=approver,
        created_at=now,
    )
