"""Requests and approvals: a user asks, the authority matrix (roles with caps, scoped to
a subtree) says who may approve how much where, a request nobody decides escalates,
an approval becomes an allocation the enforcer applies, every step is audited with
who, what, why and before/after; a sibling department sees and decides nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.clock import FakeClock
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.manage.api import ManageContext, build_app
from authz.manage.overlay import Overlay
from authz.manage.roles import ManageAuth
from authz.manage.store import MemoryAllocationStore
from authz.policy.store import PolicyStore
from tests.support.manage_env import bearer, token, write_policy
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.unit
RESEARCH = "org:acme/department:research"
ESCALATE_S = 3600


@dataclass
class Env:
    client: httpx.AsyncClient
    enforcer: Enforcer
    key: SigningKey
    clock: FakeClock
    audited: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def tok(self, sub: str, department: str | None = "research", *roles: str) -> dict[str, str]:
        # Valid for a day: the fake clock jumps past the escalation time.
        return bearer(token(self.key, sub, department, list(roles), exp=int(time.time()) + 86400))

    async def chat(self, sub: str) -> int:
        body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 50}).encode()
        d = await self.enforcer.check(CheckInput("POST", "/v1/chat/completions",
                                                 self.tok(sub), body))
        return 200 if d.allowed else d.status

    async def ask(self, tokens: int, who: str = "ursula", node: str = RESEARCH) -> httpx.Response:
        return await self.client.post("/v1/requests", headers=self.tok(who), json={
            "node": node, "budget": "dept-day", "tokens": tokens, "reason": "launch week"})


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    key = make_rsa_key("manage-requests")
    store = PolicyStore(write_policy(tmp_path, key, dept_tokens=100,
                                     extra=f"  escalate_after_s: {ESCALATE_S}\n"))
    clock = FakeClock(time.time())
    ledger = MemoryLedger(clock)
    overlay = Overlay(MemoryAllocationStore())
    enforcer = Enforcer(store, ledger, clock)
    enforcer.overlay = overlay
    auth = ManageAuth(clock)
    audited: list[tuple[str, dict[str, Any]]] = []
    app = build_app(ManageContext(store, ledger, overlay, auth, clock,
                                  audit=lambda kind, data: audited.append((kind, data))))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://manage") as client:
        yield Env(client, enforcer, key, clock, audited)
    await auth.aclose()
    await enforcer.aclose()


async def test_a_user_asks_a_manager_approves_and_the_enforcer_admits(env: Env) -> None:
    assert await env.chat("ursula") == 200
    assert await env.chat("ursula") == 429
    asked = await env.ask(40)
    assert asked.status_code == 201, asked.text
    req = asked.json()
    assert (req["status"], req["waiting_at"], req["requested_by"]) == (
        "pending", RESEARCH, f"jwt:{RESEARCH}/user:ursula")
    mine = (await env.client.get("/v1/requests", headers=env.tok("ursula"))).json()["requests"]
    assert [r["id"] for r in mine] == [req["id"]]
    head = env.tok("rhead", "research", "dept-head")
    done = await env.client.post(f"/v1/requests/{req['id']}/approve", headers=head,
                                 json={"note": "ok for launch"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "approved"
    assert done.json()["allocation_id"] == f"req-{req['id']}"
    assert await env.chat("ursula") == 200
    again = await env.client.post(f"/v1/requests/{req['id']}/approve", headers=head, json={})
    assert again.status_code == 409
    kinds = [k for k, _ in env.audited]
    assert kinds == ["quota_requested", "request_approved"]
    approved = env.audited[1][1]
    assert approved["who"] == f"jwt:{RESEARCH}/user:rhead" and approved["why"] == "ok for launch"
    assert (approved["before"], approved["after"]) == (100, 140)


async def test_over_the_cap_it_escalates_and_the_level_below_loses_it(env: Env) -> None:
    req = (await env.ask(500)).json()
    head = env.tok("rhead", "research", "dept-head")
    over = await env.client.post(f"/v1/requests/{req['id']}/approve", headers=head, json={})
    assert over.status_code == 403 and "over your limit" in over.text
    env.clock.advance(ESCALATE_S + 1)
    got = (await env.client.get(f"/v1/requests/{req['id']}", headers=head)).json()
    assert got["waiting_at"] == "org:acme"
    late = await env.client.post(f"/v1/requests/{req['id']}/reject", headers=head, json={})
    assert late.status_code == 403 and "waits at org:acme" in late.text
    admin = env.tok("ada", None, "quota-admin")
    ok = await env.client.post(f"/v1/requests/{req['id']}/approve", headers=admin, json={})
    assert ok.status_code == 200 and ok.json()["status"] == "approved"


async def test_a_rejection_is_final_and_audited(env: Env) -> None:
    req = (await env.ask(10)).json()
    head = env.tok("rhead", "research", "dept-head")
    no = await env.client.post(f"/v1/requests/{req['id']}/reject", headers=head,
                               json={"note": "not this quarter"})
    assert no.status_code == 200 and no.json()["status"] == "rejected"
    assert (await env.client.post(f"/v1/requests/{req['id']}/approve", headers=head,
                                  json={})).status_code == 409
    assert env.audited[-1][0] == "request_rejected"
    assert env.audited[-1][1]["why"] == "not this quarter"


async def test_the_sibling_department_sees_and_decides_nothing(env: Env) -> None:
    req = (await env.ask(10)).json()
    sales = env.tok("shead", "sales", "dept-head")
    assert (await env.client.get("/v1/requests", headers=sales)).json() == {"requests": []}
    for method, url in [("GET", f"/v1/requests/{req['id']}"),
                        ("POST", f"/v1/requests/{req['id']}/approve"),
                        ("POST", f"/v1/requests/{req['id']}/reject")]:
        r = await env.client.request(method, url, headers=sales,
                                     json={} if method == "POST" else None)
        assert r.status_code == 404, (url, r.text)
    # Nor may a user ask for a node off its own path.
    r = await env.ask(10, who="sally", node=RESEARCH)  # sally is of research here...
    assert r.status_code == 201
    sales_user = await env.client.post("/v1/requests", headers=env.tok("sid", "sales"), json={
        "node": RESEARCH, "budget": "dept-day", "tokens": 5, "reason": "x"})
    assert sales_user.status_code == 403
    assert (await env.client.post("/v1/requests", json={}, headers={})).status_code == 401


async def test_allocations_are_audited_with_before_and_after(env: Env) -> None:
    admin = env.tok("ada", None, "quota-admin")
    made = await env.client.post("/v1/allocations", headers=admin, json={
        "kind": "adjust", "node": RESEARCH, "budget": "dept-day", "tokens": -30,
        "reason": "overspend"})
    assert made.status_code == 201
    gone = await env.client.delete(f"/v1/allocations/{made.json()['id']}", headers=admin)
    assert gone.status_code == 204
    (k1, d1), (k2, d2) = env.audited
    assert (k1, d1["before"], d1["after"], d1["why"]) == ("allocation_created", 100, 70,
                                                           "overspend")
    assert (k2, d2["before"], d2["after"]) == ("allocation_withdrawn", 70, 100)
    assert d1["who"] == d2["who"] == "jwt:org:acme/user:ada"
