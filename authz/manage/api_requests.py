"""The request-and-approve routes: ``/v1/requests`` (authz/manage/requests.py has the
rules). Registered on the management app by :func:`add_request_routes`."""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.

import os
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from authz.errors import AuthzError, PolicyError
from authz.manage.model import NodeError, is_within, parse_node
from authz.manage.requests import QuotaRequest, allocation_for, waiting_at
from authz.manage.roles import Caller
from authz.manage.validate import field_of, parse_allocation

__all__ = ["RequestIn", "RequestOut", "add_request_routes"]


class RequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str = Field(description="a node on your own path, e.g. org:acme/team:nlp")
    budget: str
    tokens: int = Field(description="units more, while the allocation lasts")
    expires_at: float | None = Field(None, description="epoch seconds; default: open-ended")
    reason: str


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field("", max_length=1000)


class RequestOut(BaseModel):
    id: str
    node: str
    budget: str
    tokens: int
    expires_at: float | None
    reason: str
    requested_by: str
    created_at: float
    status: str
    waiting_at: str | None
    decided_by: str | None
    decided_at: float | None
    note: str
    allocation_id: str | None


class RequestList(BaseModel):
    requests: list[RequestOut]


Audit = Callable[[str, dict[str, Any]], None]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no credential, or one that does not verify"},
    403: {"description": "not a node of yours, or not yours to decide"},
    404: {"description": "no such request you may see"},
    503: {"description": "the store cannot be reached"},
}


def add_request_routes(app: FastAPI, ctx: Any, caller: Callable[..., Coroutine[Any, Any, Caller]],
                       audit: Audit) -> None:  # fmt: skip
    Who = Annotated[Caller, Depends(caller)]
    store = ctx.overlay.store

    def escalate_s() -> float:
        return float(ctx.store.current.management.escalate_after_s)

    def out(r: QuotaRequest, now: float) -> RequestOut:
        waits = waiting_at(r, now, escalate_s()) if r.status == "pending" else None
        return RequestOut(**_fields(r), waiting_at=waits)

    def visible(who: Caller, r: QuotaRequest) -> bool:
        return r.requested_by == who.who or who.can_read(r.node)

    async def load(who: Caller, request_id: str) -> QuotaRequest:
        try:
            found = [QuotaRequest.from_json(b) for b in await store.requests()]
        except AuthzError as exc:
            raise HTTPException(503, f"unavailable: {exc}") from None
        for r in found:
            if r.id == request_id and visible(who, r):
                return r
        raise HTTPException(404, "no such request")

    @app.post("/v1/requests", response_model=RequestOut, status_code=201, responses=_ERRORS)
    async def ask(who: Who, body: RequestIn) -> RequestOut:
        """Ask for more quota on a node of your own path, with a reason."""
        try:
            parse_node(body.node)
        except NodeError:
            pass  # parse_allocation names the field
        else:
            own = who.path is not None and is_within(who.path, body.node)
            if not own and not who.can_read(body.node):
                raise HTTPException(403, "you may ask only for nodes on your own path")
        now = ctx.clock.now()
        raw = {**body.model_dump(exclude_unset=True), "kind": "adjust"}
        try:
            draft = parse_allocation(raw, ctx.store.current, now, who.who)
        except PolicyError as exc:
            raise HTTPException(422, [{"loc": ["body", field_of(exc)], "msg": str(exc),
                                       "type": "value_error"}]) from None  # fmt: skip
        if draft.tokens <= 0:
            raise HTTPException(422, [{"loc": ["body", "tokens"], "type": "value_error",
                                       "msg": "allocation:tokens: a request asks for more"
                                       f" (got {draft.tokens})"}])  # fmt: skip
        assert draft.budget is not None
        req = QuotaRequest(os.urandom(8).hex(), draft.node, draft.budget, draft.tokens,
                           draft.expires_at, draft.reason, who.who, now)  # fmt: skip
        try:
            await store.put_request(req.id, req.to_json())
        except AuthzError as exc:
            raise HTTPException(503, f"unavailable: {exc}") from None
        audit("quota_requested", {"who": who.who, "request": req.id, "node": req.node,
                                  "budget": req.budget, "tokens": req.tokens,
                                  "why": req.reason})  # fmt: skip
        return out(req, now)

    @app.get("/v1/requests", response_model=RequestList, responses=_ERRORS)
    async def list_requests(who: Who) -> RequestList:
        """Your own requests, and those in the subtree your roles cover."""
        try:
            found = [QuotaRequest.from_json(b) for b in await store.requests()]
        except AuthzError as exc:
            raise HTTPException(503, f"unavailable: {exc}") from None
        now = ctx.clock.now()
        mine = sorted((r for r in found if visible(who, r)), key=lambda r: r.created_at)
        return RequestList(requests=[out(r, now) for r in mine])

    @app.get("/v1/requests/{request_id}", response_model=RequestOut, responses=_ERRORS)
    async def get_request(who: Who, request_id: str) -> RequestOut:
        return out(await load(who, request_id), ctx.clock.now())

    async def decide(who: Caller, request_id: str, note: str, approve: bool) -> RequestOut:
        r = await load(who, request_id)
        now = ctx.clock.now()
        if r.status != "pending":
            raise HTTPException(409, f"already {r.status}")
        waits = waiting_at(r, now, escalate_s())
        if not who.can_read(waits):
            raise HTTPException(403, f"the request waits at {waits}, above your roles"
                                if who.can_read(r.node) else "not yours to decide")
        budget = next((b for b in ctx.store.current.budgets if b.name == r.budget), None)
        if budget is None:
            raise HTTPException(409, f"budget {r.budget} is no longer in the policy")
        grant, cap = who.writer(waits, budget.tokens)
        if grant is None:
            raise HTTPException(403, "your roles may read here but not decide requests")
        before = ctx.overlay.delta(r.budget, r.node, now) + budget.tokens
        if not approve:
            done = r.decided("rejected", who.who, now, note)
            await _save(store, done)
            audit("request_rejected", {"who": who.who, "request": r.id, "node": r.node,
                                       "why": note, "before": before, "after": before})
            return out(done, now)
        held = sum(a.tokens for a in ctx.overlay.allocations if a.tokens > 0
                   and a.budget == r.budget and a.node == r.node
                   and (a.expires_at is None or a.expires_at > now))  # fmt: skip
        if cap is not None and held + r.tokens > cap:
            raise HTTPException(403, f"over your limit: raises on {r.budget} for {r.node} may"
                                f" add up to {cap} ({held} already active); it can escalate")
        allocation = allocation_for(r, who.who, now)
        done = r.decided("approved", who.who, now, note, allocation.id)
        try:
            await store.add(allocation)  # the id is the request's: a race makes one
            await _save(store, done)
            await ctx.overlay.refresh()
        except AuthzError as exc:
            raise HTTPException(503, f"unavailable: {exc}") from None
        audit("request_approved", {"who": who.who, "request": r.id, "node": r.node,
                                   "budget": r.budget, "why": note or r.reason,
                                   "allocation": allocation.id, "before": before,
                                   "after": before + r.tokens})  # fmt: skip
        return out(done, now)

    @app.post("/v1/requests/{request_id}/approve", response_model=RequestOut,
              responses={**_ERRORS, 409: {"description": "already decided"}})
    async def approve(who: Who, request_id: str, body: DecisionIn) -> RequestOut:
        """Approve: the request becomes an allocation at once."""
        return await decide(who, request_id, body.note, True)

    @app.post("/v1/requests/{request_id}/reject", response_model=RequestOut,
              responses={**_ERRORS, 409: {"description": "already decided"}})
    async def reject(who: Who, request_id: str, body: DecisionIn) -> RequestOut:
        return await decide(who, request_id, body.note, False)


def _fields(r: QuotaRequest) -> dict[str, Any]:
    return {f: getattr(r, f) for f in QuotaRequest.__dataclass_fields__}


async def _save(store: Any, r: QuotaRequest) -> None:
    try:
        await store.put_request(r.id, r.to_json())
    except AuthzError as exc:
        raise HTTPException(503, f"unavailable: {exc}") from None
