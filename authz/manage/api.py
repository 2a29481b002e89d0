"""The management API's routes (FastAPI): nodes, budgets, allocations.

Every route takes its caller from :class:`authz.manage.roles.ManageAuth` and shows or
changes only what the caller's grants cover (the rules are in authz/manage/roles.py).
Bodies are validated twice: their shape by pydantic (authz/manage/schema.py), their
meaning by the policy loader's reader (authz/manage/validate.py); both answer 422 with
the field named in ``detail[].loc``. A store or ledger that cannot be reached is 503.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime,
# and the route signatures name local aliases (Who) that a string could not resolve.

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from authz.clock import Clock
from authz.errors import AuthzError, LedgerUnavailable, PolicyError
from authz.ledger.base import Ledger
from authz.manage.api_requests import add_request_routes
from authz.manage.body_limit import BodyLimit
from authz.manage.model import Allocation, NodeError, is_within, parse_node
from authz.manage.overlay import Overlay
from authz.manage.roles import Caller, Denied, ManageAuth
from authz.manage.schema import (
    AllocationIn,
    AllocationList,
    AllocationOut,
    BudgetsOut,
    CallerOut,
    CounterOut,
    GrantOut,
    NodeList,
    NodeOut,
)
from authz.manage.validate import field_of, parse_allocation
from authz.manage.views import counters_for, nodes_known
from authz.policy.store import PolicyStore

__all__ = ["ManageContext", "build_app"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no credential, or one that does not verify"},
    403: {"description": "the caller's roles do not cover this node or action"},
    503: {"description": "the allocation store or the ledger cannot be reached"},
}
_NODE = Query(description="a node path, e.g. org:acme/department:research", max_length=4096)


@dataclass
class ManageContext:
    store: PolicyStore
    ledger: Ledger
    overlay: Overlay
    auth: ManageAuth
    clock: Clock
    # The audit chain (authz/audit/trail.py): (kind, data); None: not recorded.
    audit: Callable[[str, dict[str, Any]], None] | None = None


def _invalid(where: str, field: str, message: str) -> HTTPException:
    return HTTPException(422, [{"loc": [where, field], "msg": message, "type": "value_error"}])


def _node(value: str, caller: Caller) -> str:
    try:
        parse_node(value)
    except NodeError as exc:
        raise _invalid("query", "node", f"node: {exc}") from None
    if not caller.can_read(value):
        raise HTTPException(403, "outside the subtree your roles cover")
    return value


def build_app(ctx: ManageContext) -> FastAPI:
    app = FastAPI(title="authz quota management", version="1", openapi_url="/v1/openapi.json",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.add_middleware(BodyLimit)  # every body here is a small JSON object (body_limit.py)
    bearer = HTTPBearer(auto_error=False, description="a JWT of the policy's issuer, or an"
                        " admin key (management.admin_keys_file)")  # fmt: skip

    async def identify(request: Request, need_role: bool) -> Caller:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            return await ctx.auth.caller(ctx.store.current, headers, need_role)
        except Denied as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            raise HTTPException(exc.status, exc.message, headers=extra) from None

    async def caller(request: Request,
                     _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                     ) -> Caller:  # fmt: skip
        return await identify(request, True)

    async def anyone(request: Request,
                     _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                     ) -> Caller:  # fmt: skip
        """Any verified caller, with or without a role (it may ask for quota)."""
        return await identify(request, False)

    def audit(kind: str, data: dict[str, Any]) -> None:
        if ctx.audit is not None:
            ctx.audit(kind, data)

    def effective(a: Allocation, now: float) -> int | bool:
        """What a change acts on: the budget's amount on the node, or whether it is frozen."""
        if a.budget is None:
            return ctx.overlay.frozen(parse_node(a.node), now) is not None
        budget = next((b for b in ctx.store.current.budgets if b.name == a.budget), None)
        base = budget.tokens + budget.soft_grace + budget.burst if budget is not None else 0
        return max(0, base + ctx.overlay.delta(a.budget, a.node, now))

    def changed(kind: str, who: Caller, a: Allocation, before: int | bool, now: float) -> None:
        audit(kind, {"who": who.who, "allocation": a.id, "kind": a.kind, "node": a.node,
                     "budget": a.budget, "tokens": a.tokens, "expires_at": a.expires_at,
                     "why": a.reason, "before": before, "after": effective(a, now)})

    Who = Annotated[Caller, Depends(caller)]

    async def guarded(fn: Any) -> Any:
        try:
            return await fn
        except (LedgerUnavailable, AuthzError) as exc:
            raise HTTPException(503, f"unavailable: {exc}") from None

    @app.get("/v1/me", response_model=CallerOut, responses=_ERRORS)
    async def me(who: Annotated[Caller, Depends(anyone)]) -> CallerOut:
        """The caller and the roles its credential carries."""
        return CallerOut(who=who.who, grants=[GrantOut(role=g.role, scope=g.scope)
                                              for g in who.grants])  # fmt: skip

    @app.get("/v1/nodes", response_model=NodeList, responses=_ERRORS)
    async def nodes(who: Who, under: Annotated[str | None, _NODE] = None) -> NodeList:
        """The hierarchy as the service sees it: nodes the policy names, nodes seen in
        checks, nodes with allocations; only those the caller's roles cover."""
        top = _node(under, who) if under is not None else None
        seen = await guarded(ctx.overlay.store.nodes())
        allocated = {a.node for a in ctx.overlay.allocations}
        found = [NodeOut.of(n) for n in nodes_known(ctx.store.current, seen, allocated)
                 if who.can_read(n.node) and (top is None or is_within(n.node, top))]  # fmt: skip
        return NodeList(nodes=found)

    @app.get("/v1/budgets", response_model=BudgetsOut, responses=_ERRORS)
    async def budgets(who: Who, node: Annotated[str, _NODE]) -> BudgetsOut:
        """The budgets and rates counted on ``node``: limits (YAML and effective), used,
        reserved, remaining, and when the window resets."""
        node = _node(node, who)
        now = ctx.clock.now()
        counters = await guarded(counters_for(node, ctx.store.current, ctx.ledger, ctx.overlay,
                                              now))  # fmt: skip
        frozen = ctx.overlay.frozen(parse_node(node), now)
        return BudgetsOut(node=node, frozen=AllocationOut.of(frozen, now) if frozen else None,
                          counters=[CounterOut.of(c, now) for c in counters])  # fmt: skip

    @app.get("/v1/allocations", response_model=AllocationList, responses=_ERRORS)
    async def list_allocations(who: Who, node: Annotated[str | None, _NODE] = None
                               ) -> AllocationList:  # fmt: skip
        """Allocations in force or still to start, in the caller's subtree (or ``node``'s)."""
        top = _node(node, who) if node is not None else None
        await guarded(ctx.overlay.refresh())
        now = ctx.clock.now()
        found = [AllocationOut.of(a, now) for a in ctx.overlay.allocations
                 if (a.expires_at is None or a.expires_at > now) and who.can_read(a.node)
                 and (top is None or is_within(a.node, top))]  # fmt: skip
        return AllocationList(allocations=sorted(found, key=lambda a: (a.node, a.created_at)))

    @app.get("/v1/allocations/{allocation_id}", response_model=AllocationOut,
             responses={**_ERRORS, 404: {"description": "no such allocation you may see"}})
    async def get_allocation(who: Who, allocation_id: str) -> AllocationOut:
        await guarded(ctx.overlay.refresh())
        for a in ctx.overlay.allocations:
            if a.id == allocation_id and who.can_read(a.node):
                return AllocationOut.of(a, ctx.clock.now())
        raise HTTPException(404, "no such allocation")

    @app.post("/v1/allocations", response_model=AllocationOut, status_code=201,
              responses={**_ERRORS, 422: {"description": "invalid: detail names the field"}})
    async def create_allocation(who: Who, body: AllocationIn) -> AllocationOut:
        """Raise or lower a budget on a node, grant an emergency allocation, or freeze."""
        with_node = isinstance(body.node, str)
        try:
            parse_node(body.node)
        except NodeError:
            with_node = False  # parse_allocation names the field
        if with_node and not who.can_read(body.node):
            raise HTTPException(403, "outside the subtree your roles cover")
        policy, now = ctx.store.current, ctx.clock.now()
        try:
            new = parse_allocation(body.model_dump(exclude_unset=True), policy, now, who.who)
        except PolicyError as exc:
            raise _invalid("body", field_of(exc), str(exc)) from None
        budget = next((b for b in policy.budgets if b.name == new.budget), None)
        yaml_amount = budget.tokens if budget is not None else 0
        grant, cap = who.writer(new.node, yaml_amount)
        if grant is None:
            raise HTTPException(403, "your roles may read here but not change allocations")
        await guarded(ctx.overlay.refresh())
        if cap is not None and new.tokens > 0:
            held = sum(a.tokens for a in ctx.overlay.allocations if a.tokens > 0
                       and a.budget == new.budget and a.node == new.node
                       and (a.expires_at is None or a.expires_at > now))  # fmt: skip
            if held + new.tokens > cap:
                raise HTTPException(403, f"over your limit: raises on {new.budget} for"
                                    f" {new.node} may add up to {cap} ({held} already active)")
        before = effective(new, now)
        await guarded(ctx.overlay.store.add(new))
        await guarded(ctx.overlay.store.purge(now - 86400.0))  # keep a day of expired ones
        await guarded(ctx.overlay.refresh())
        changed("allocation_created", who, new, before, now)
        return AllocationOut.of(new, now)

    @app.delete("/v1/allocations/{allocation_id}", status_code=204, response_class=Response,
                responses={**_ERRORS, 404: {"description": "no such allocation you may see"}})
    async def delete_allocation(who: Who, allocation_id: str) -> Response:
        """Withdraw an allocation. Managers and approvers withdraw their own; admins any
        in their subtree."""
        await guarded(ctx.overlay.refresh())
        found = next((a for a in ctx.overlay.allocations
                      if a.id == allocation_id and who.can_read(a.node)), None)  # fmt: skip
        if found is None:
            raise HTTPException(404, "no such allocation")
        grant, _ = who.writer(found.node, 0)
        if grant is None or (grant.role != "admin" and found.created_by != who.who):
            raise HTTPException(403, "only its author or an admin may withdraw it")
        now = ctx.clock.now()
        before = effective(found, now)
        await guarded(ctx.overlay.store.remove(allocation_id))
        await guarded(ctx.overlay.refresh())
        changed("allocation_withdrawn", who, found, before, now)
        return Response(status_code=204)

    add_request_routes(app, ctx, anyone, audit)
    return app
