"""The management API's request and response bodies (pydantic): the OpenAPI document
at ``/v1/openapi.json`` is derived from these and from the typed routes, never written
by hand. Semantic checks (does the budget exist, is the amount in bounds) are the policy
loader's, in :mod:`authz.manage.validate`; these models only give the JSON its shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from authz.manage.model import Allocation
from authz.manage.views import Counter, NodeInfo

__all__ = [
    "AllocationIn",
    "AllocationList",
    "AllocationOut",
    "BudgetsOut",
    "CallerOut",
    "CounterOut",
    "NodeList",
    "NodeOut",
]


class AllocationIn(BaseModel):
    """A runtime change over the YAML policy."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["adjust", "emergency", "freeze"]
    node: str = Field(description="a node path, e.g. org:acme/department:research")
    budget: str | None = Field(None, description="the budget's name (adjust, emergency)")
    tokens: int | None = Field(None, description="units to add (negative: to take away)")
    starts_at: float | None = Field(None, description="epoch seconds; default now")
    expires_at: float | None = Field(None, description="epoch seconds; required for emergency")
    reason: str = Field(description="why: kept with the allocation and shown to a frozen caller")


class AllocationOut(BaseModel):
    id: str
    kind: str
    node: str
    budget: str | None
    tokens: int
    starts_at: float
    expires_at: float | None
    reason: str
    created_by: str
    created_at: float
    active: bool

    @classmethod
    def of(cls, a: Allocation, now: float) -> AllocationOut:
        return cls(id=a.id, kind=a.kind, node=a.node, budget=a.budget, tokens=a.tokens,
                   starts_at=a.starts_at, expires_at=a.expires_at, reason=a.reason,
                   created_by=a.created_by, created_at=a.created_at,
                   active=a.active(now))  # fmt: skip


class AllocationList(BaseModel):
    allocations: list[AllocationOut]


class CounterOut(BaseModel):
    name: str
    kind: str
    period: str
    unit: str
    yaml_limit: int
    limit: int
    used: int
    reserved: int
    remaining: int
    window_start: float | None
    reset_at: float | None
    reset_after_s: float | None

    @classmethod
    def of(cls, c: Counter, now: float) -> CounterOut:
        after = None if c.reset_at is None else max(0.0, c.reset_at - now)
        return cls(name=c.name, kind=c.kind, period=c.period, unit=c.unit,
                   yaml_limit=c.yaml_limit, limit=c.limit, used=c.used, reserved=c.reserved,
                   remaining=c.remaining, window_start=c.window_start, reset_at=c.reset_at,
                   reset_after_s=after)  # fmt: skip


class BudgetsOut(BaseModel):
    node: str
    frozen: AllocationOut | None
    counters: list[CounterOut]


class NodeOut(BaseModel):
    node: str
    level: str
    name: str
    parent: str | None
    sources: list[str]

    @classmethod
    def of(cls, n: NodeInfo) -> NodeOut:
        return cls(node=n.node, level=n.level, name=n.name, parent=n.parent,
                   sources=list(n.sources))  # fmt: skip


class NodeList(BaseModel):
    nodes: list[NodeOut]


class GrantOut(BaseModel):
    role: str
    scope: str = Field(description="the node the role covers; empty: every org")


class CallerOut(BaseModel):
    who: str
    grants: list[GrantOut]
