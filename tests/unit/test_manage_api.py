"""The management API in-process: roles, subtree scoping, validation, allocations
changing what the enforcer admits. Every endpoint is tried by a caller of a sibling
department, who must get 403 or 404 and never data."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authz.clock import FakeClock
from authz.decision import DenyReason
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.manage.api import ManageContext, build_app
from authz.manage.overlay import Overlay
from authz.manage.roles import ManageAuth
from authz.manage.store import MemoryAllocationStore
from authz.policy.store import PolicyStore
from tests.support.manage_env import ADMIN_KEY, bearer, token, write_policy
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.unit
RESEARCH = "org:acme/department:research"
SALES = "org:acme/department:sales"


@dataclass
class Env:
    client: httpx.AsyncClient
    enforcer: Enforcer
    key: SigningKey
    clock: FakeClock

    def tok(self, sub: str, department: str | None = "research", *roles: str) -> dict[str, str]:
        return bearer(token(self.key, sub, department, list(roles)))

    async def chat(self, sub: str, department: str = "research") -> int:
        body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 50}).encode()
        d = await self.enforcer.check(CheckInput("POST", "/v1/chat/completions",
                                                 self.tok(sub, department), body))
        return 200 if d.allowed else d.status


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    key = make_rsa_key("manage-unit")
    store = PolicyStore(write_policy(tmp_path, key, dept_tokens=100))
    clock = FakeClock(time.time())  # the tokens are minted on the real clock
    ledger = MemoryLedger(clock)
    overlay = Overlay(MemoryAllocationStore())
    enforcer = Enforcer(store, ledger, clock)
    enforcer.overlay = overlay
    auth = ManageAuth(clock)
    app = build_app(ManageContext(store, ledger, overlay, auth, clock))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://manage") as client:
        yield Env(client, enforcer, key, clock)
    await auth.aclose()
    await enforcer.aclose()


def raise_body(tokens: int = 40, node: str = RESEARCH, **extra: object) -> dict[str, object]:
    return {"kind": "adjust", "node": node, "budget": "dept-day", "tokens": tokens,
            "reason": "quarter end", **extra}


async def test_no_credential_is_401_everywhere(env: Env) -> None:
    c = env.client
    for method, url in [("GET", "/v1/nodes"), ("GET", f"/v1/budgets?node={RESEARCH}"),
                        ("GET", "/v1/allocations"), ("GET", "/v1/allocations/x"),
                        ("POST", "/v1/allocations"), ("DELETE", "/v1/allocations/x"),
                        ("GET", "/v1/me")]:
        r = await c.request(method, url, json=raw_body() if method == "POST" else None)
        assert r.status_code == 401, (method, url, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = await c.get("/v1/nodes", headers=bearer("not-a-known-admin-key"))
    assert r.status_code == 401
    forged = token(make_rsa_key("someone-else"), "mallory", "research", ["quota-admin"])
    assert (await c.get("/v1/nodes", headers=bearer(forged))).status_code == 401


def raw_body() -> dict[str, object]:
    return raise_body()


async def test_a_token_without_a_role_is_403(env: Env) -> None:
    r = await env.client.get("/v1/nodes", headers=env.tok("bob"))
    assert r.status_code == 403


async def test_manager_raises_its_department_and_the_enforcer_admits(env: Env) -> None:
    # dept-day is 100 units; each request reserves its prompt plus 50 output.
    assert await env.chat("u1") == 200
    assert await env.chat("u2") == 429  # research's day budget is spent
    head = env.tok("rhead", "research", "dept-head")
    r = await env.client.post("/v1/allocations", json=raise_body(50), headers=head)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["created_by"] == f"jwt:{RESEARCH}/user:rhead" and made["active"]
    assert await env.chat("u2") == 200  # the raise is in force at once
    r = await env.client.get(f"/v1/budgets?node={RESEARCH}", headers=head)
    counter = r.json()["counters"][0]
    assert (counter["name"], counter["yaml_limit"], counter["limit"]) == ("dept-day", 100, 150)
    assert counter["used"] + counter["reserved"] > 100
    # Over the manager's cap (50% of 100, 50 already active): refused, nothing stored.
    r = await env.client.post("/v1/allocations", json=raise_body(1), headers=head)
    assert r.status_code == 403 and "over your limit" in r.text
    # Withdrawn: the YAML amount is back.
    assert (await env.client.delete(f"/v1/allocations/{made['id']}", headers=head)
            ).status_code == 204
    assert await env.chat("u3") == 429


async def test_sibling_manager_gets_403_or_404_on_every_endpoint(env: Env) -> None:
    head = env.tok("rhead", "research", "dept-head")
    made = (await env.client.post("/v1/allocations", json=raise_body(10), headers=head)).json()
    assert await env.chat("u1") == 200  # research is now a seen node
    await env.enforcer.overlay.store.note_nodes([f"{RESEARCH}/user:u1"])  # type: ignore[union-attr]
    c, sales = env.client, env.tok("shead", "sales", "dept-head")
    for url in (f"/v1/budgets?node={RESEARCH}", f"/v1/nodes?under={RESEARCH}",
                f"/v1/allocations?node={RESEARCH}", f"/v1/budgets?node={RESEARCH}/user:u1",
                "/v1/budgets?node=org:acme"):
        r = await c.get(url, headers=sales)
        assert r.status_code == 403, (url, r.text)
        assert "research" not in r.text and "u1" not in r.text
    r = await c.get(f"/v1/allocations/{made['id']}", headers=sales)
    assert r.status_code == 404
    r = await c.delete(f"/v1/allocations/{made['id']}", headers=sales)
    assert r.status_code == 404
    r = await c.post("/v1/allocations", json=raise_body(10), headers=sales)
    assert r.status_code == 403
    r = await c.post("/v1/allocations", headers=sales,
                     json={"kind": "freeze", "node": RESEARCH, "reason": "x"})
    assert r.status_code == 403
    # Listings filter to the caller's subtree: nothing of research shows.
    for url in ("/v1/nodes", "/v1/allocations"):
        r = await c.get(url, headers=sales)
        assert r.status_code == 200 and "research" not in r.text and "u1" not in r.text
    mine = (await c.get("/v1/nodes", headers=head)).json()["nodes"]
    assert {n["node"] for n in mine} >= {RESEARCH, f"{RESEARCH}/user:u1"}
    assert all(n["node"].startswith(RESEARCH) for n in mine)
    # An org admin sees both departments.
    admin = env.tok("ada", None, "quota-admin")
    seen = {n["node"] for n in (await c.get("/v1/nodes", headers=admin)).json()["nodes"]}
    assert {"org:acme", RESEARCH} <= seen
    # Another org's admin sees nothing of acme.
    other = bearer(token(env.key, "olga", None, ["quota-admin"], org="globex"))
    r = await c.get("/v1/budgets?node=org:acme", headers=other)
    assert r.status_code == 403
    r = await c.get("/v1/allocations", headers=other)
    assert r.json() == {"allocations": []}


async def test_viewer_reads_but_cannot_allocate(env: Env) -> None:
    viewer = env.tok("fin", "research", "finance")
    assert (await env.client.get(f"/v1/budgets?node={RESEARCH}", headers=viewer)
            ).status_code == 200
    r = await env.client.post("/v1/allocations", json=raise_body(1), headers=viewer)
    assert r.status_code == 403


async def test_freeze_denies_the_subtree_with_a_clear_403(env: Env) -> None:
    admin = bearer(ADMIN_KEY)
    r = await env.client.post("/v1/allocations", headers=admin, json={
        "kind": "freeze", "node": RESEARCH, "reason": "incident 42"})
    assert r.status_code == 201, r.text
    body = json.dumps({"model": "gpt-4o", "messages": [], "max_tokens": 5}).encode()
    d = await env.enforcer.check(CheckInput("POST", "/v1/chat/completions",
                                            env.tok("u1"), body))
    assert (d.status, d.reason) == (403, DenyReason.NODE_FROZEN)
    assert "incident 42" in d.message and RESEARCH in d.message
    assert await env.chat("s1", "sales") == 200  # a sibling is not frozen
    frozen = (await env.client.get(f"/v1/budgets?node={RESEARCH}", headers=admin)).json()
    assert frozen["frozen"]["reason"] == "incident 42"


async def test_emergency_expires_at_its_time(env: Env) -> None:
    admin = bearer(ADMIN_KEY)
    assert await env.chat("u1") == 200
    r = await env.client.post("/v1/allocations", headers=admin, json={
        "kind": "emergency", "node": RESEARCH, "budget": "dept-day", "tokens": 1000,
        "expires_at": env.clock.now() + 60, "reason": "launch"})
    assert r.status_code == 201, r.text
    assert await env.chat("u2") == 200
    env.clock.advance(61)
    assert await env.chat("u3") == 429


@pytest.mark.parametrize(("body", "field", "words"), [
    (raise_body(2**53), "tokens", "must be at most 9007199254740991"),
    (raise_body(0), "tokens", "must be an integer >= 1"),
    (raise_body(budget="nope"), "budget", "no budget of that name"),
    (raise_body(budget="user-day"), "budget", "does not count on"),
    (raise_body(node="org:acme/team:x/department:y"), "node", "out of order"),
    (raise_body(node="org:acme/department:re search"), "node", "reserved character"),
    (raise_body(expires_at=1.0), "expires_at", "must be later than now"),
    ({"kind": "emergency", "node": RESEARCH, "budget": "dept-day", "tokens": 5,
      "reason": "r"}, "expires_at", "is required for an emergency"),
    ({"kind": "freeze", "node": RESEARCH, "tokens": 5, "reason": "r"}, "tokens", "no budget"),
    (raise_body(reason=" "), "reason", "non-empty string"),
    (raise_body(unknown=1), "unknown", "Extra inputs"),
    (raise_body(tokens="ten"), "tokens", "valid integer"),
])  # fmt: skip
async def test_a_bad_allocation_is_422_naming_the_field(env: Env, body: dict[str, object],
                                                        field: str, words: str) -> None:
    r = await env.client.post("/v1/allocations", json=body, headers=bearer(ADMIN_KEY))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == field and words in detail["msg"], detail
    assert (await env.client.get("/v1/allocations", headers=bearer(ADMIN_KEY))
            ).json() == {"allocations": []}


async def test_openapi_is_derived_from_the_routes(env: Env) -> None:
    doc = (await env.client.get("/v1/openapi.json")).json()
    assert {"/v1/nodes", "/v1/budgets", "/v1/allocations", "/v1/allocations/{allocation_id}"
            } <= set(doc["paths"])
    assert "AllocationIn" in doc["components"]["schemas"]
