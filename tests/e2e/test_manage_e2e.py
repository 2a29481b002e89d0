"""The management walk-through through the real Envoy, two replicas sharing Redis.

A user of research is denied (the department's budget is spent), asks for more
through replica A's management API; an approver of research approves through replica
B; the user's next requests through Envoy (openai SDK), on both replicas (Envoy
round-robins the checks), are served. A manager of the sibling department sales can neither see nor change any
of it (403), and a freeze by an admin turns the user away with a 403 in OpenAI's
error format.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.envoy_proc import EnvoyProcess, Mutator, cluster
from tests.support.fake_llm import FakeLLMThread
from tests.support.manage_env import ADMIN_KEY, bearer, token, write_policy
from tests.support.ports import free_port
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e
RESEARCH = "org:acme/department:research"
BODY: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 50,
                        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


@pytest.fixture(scope="module")
def replica_ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def authz_port(replica_ports: tuple[int, int]) -> int:
    return replica_ports[0]


@pytest.fixture(scope="module")
def envoy_mutate(replica_ports: tuple[int, int]) -> Mutator:
    def both(cfg: dict[str, Any]) -> None:
        authz = cluster(cfg, "authz")
        authz["lb_policy"] = "ROUND_ROBIN"
        authz["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}}}}
            for port in replica_ports
        ]}]  # fmt: skip

    return both


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return make_rsa_key("manage-e2e")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, key: SigningKey, redis: RedisServer,
             replica_ports: tuple[int, int]) -> Iterator[list[AuthzService]]:  # fmt: skip
    services = []
    try:
        for i, port in enumerate(replica_ports):
            workdir = tmp_path_factory.mktemp(f"manage-replica{i}")
            # 10 units a day for a department: less than any request reserves.
            policy = write_policy(workdir, key, dept_tokens=10)
            services.append(AuthzService(policy, grpc_port=port, workdir=workdir,
                                         extra_args=["--ledger", redis.url]).start())  # fmt: skip
        yield services
    finally:
        for svc in services:
            svc.stop()


def _chat(gw: EnvoyProcess, tok: str) -> int:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=tok, max_retries=0,
                       timeout=20) as client:  # fmt: skip
        try:
            client.chat.completions.create(**BODY)
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


def test_denied_then_raised_through_the_api_then_served_on_both_replicas(
    envoy: EnvoyProcess, replicas: list[AuthzService], fake_llm: FakeLLMThread, key: SigningKey
) -> None:
    a, b = replicas
    user = token(key, "ursula", "research")
    with (openai.OpenAI(base_url=envoy.url + "/v1", api_key=user, max_retries=0) as client,
          pytest.raises(openai.RateLimitError) as denied):
        client.chat.completions.create(**BODY)
    assert denied.value.code == "insufficient_quota"
    assert "dept-day" in denied.value.message and RESEARCH in denied.value.message

    sales = bearer(token(key, "sam", "sales", ["dept-head"]))
    approver = bearer(token(key, "rita", "research", ["approver"]))
    ask = {"node": RESEARCH, "budget": "dept-day", "tokens": 100000, "reason": "launch week"}
    with httpx.Client(base_url=a.manage_url, timeout=20) as api:
        # The user asks through replica A, with its own token (no role needed for that).
        asked = api.post("/v1/requests", json=ask, headers=bearer(user))
        assert asked.status_code == 201, asked.text
        req = asked.json()
        assert (req["status"], req["waiting_at"]) == ("pending", RESEARCH)
    with httpx.Client(base_url=b.manage_url, timeout=20) as api:
        # The sibling department's manager, on replica B: nothing to see or decide.
        assert api.get("/v1/requests", headers=sales).json() == {"requests": []}
        assert api.post(f"/v1/requests/{req['id']}/approve", json={},
                        headers=sales).status_code == 404  # fmt: skip
        assert api.get("/v1/budgets", params={"node": RESEARCH},
                       headers=sales).status_code == 403  # fmt: skip
        # Research's approver approves on replica B: it becomes an allocation.
        done = api.post(f"/v1/requests/{req['id']}/approve", json={"note": "go"},
                        headers=approver)  # fmt: skip
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "approved"
        assert api.get("/v1/allocations", headers=sales).json() == {"allocations": []}
        assert api.get(f"/v1/allocations/{done.json()['allocation_id']}",
                       headers=sales).status_code == 404  # fmt: skip

    # In force on replica B at once, on A within the poll (0.2 s): wait for the first
    # success, then every check (round-robin over both replicas) must pass.
    deadline = time.monotonic() + 10
    while _chat(envoy, user) != 200:
        assert time.monotonic() < deadline, "the raise never took effect"
    assert [_chat(envoy, user) for _ in range(4)] == [200] * 4
    assert fake_llm.records, "served by the model upstream"

    with httpx.Client(base_url=b.manage_url, timeout=20, headers=bearer(ADMIN_KEY)) as api:
        counters = api.get("/v1/budgets", params={"node": RESEARCH}).json()["counters"]
        assert counters[0]["limit"] == 100010 and counters[0]["used"] > 10
        frozen = api.post("/v1/allocations", json={"kind": "freeze", "node": RESEARCH,
                                                   "reason": "incident 7"})  # fmt: skip
        assert frozen.status_code == 201
    deadline = time.monotonic() + 10
    while (status := _chat(envoy, user)) != 403:
        assert time.monotonic() < deadline and status == 200, status
    with (openai.OpenAI(base_url=envoy.url + "/v1", api_key=user, max_retries=0) as client,
          pytest.raises(openai.PermissionDeniedError) as refused):
        client.chat.completions.create(**BODY)
    assert refused.value.code == "node_frozen" and "incident 7" in refused.value.message
