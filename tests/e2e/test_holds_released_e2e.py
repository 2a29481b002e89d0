"""Every refusal after admission gives the hold back (issue 16, holds released).

Check reserves before anything else has had its say. After it, a guardrail may answer
locally (a filter placed after ext_authz, a route's ``direct_response``), the upstream
may fail (non-2xx, no connection), or the client may leave before the upstream
answered. In each case the ledger must hold nothing once the response is over, and
charge no more than was produced: through the real Envoy, read from the Redis counters.

``confirm_s`` is 30 s and every wait here is shorter, so a hold that is only given back
by the tentative-hold sweep (authz.confirm) fails the test instead of passing late.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.redis_env import (  # noqa: F401  (fixtures, found by name)
    day_counter,
    gw_fixture,
    redis_fixture,
    redis_service,
)
from tests.e2e.spine_env import token
from tests.support.envoy_proc import EnvoyProcess, Mutator, cluster, http_filters
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e

ORG = "holds"
POLICY = """
version: 1
timezone: UTC
identity:
  jwt: {{issuer: https://idp.test/, audience: llm-gateway, algorithms: [RS256],
        jwks_url: {jwks_url}, leeway_s: 5}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
  unknown: deny
reservations: {{ttl_s: 600, confirm_s: 30}}
"""
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
CANNED = json.dumps(
    {
        "id": "guard",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "I cannot help with that."},
                "finish_reason": "stop",
            }
        ],
    }
)  # a guardrail's answer in the provider's format: no usage

# A guardrail after ext_authz, before ext_proc: answers locally on its header.
LUA = """
function envoy_on_request(h)
  local guard = h:headers():get("x-lua-guard")
  if guard == "403" then
    h:respond({[":status"] = "403", ["content-type"] = "application/json"},
              '{"error":{"message":"blocked by guardrail"}}')
  elseif guard == "200" then
    h:respond({[":status"] = "200", ["content-type"] = "application/json"}, CANNED)
  end
end
"""


def _mutate(dead_port: int) -> Mutator:
    def mutate(cfg: dict[str, Any]) -> None:
        chain = http_filters(cfg)
        at = next(i for i, f in enumerate(chain) if f["name"] == "envoy.filters.http.ext_proc")
        chain.insert(at, {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": LUA.replace("CANNED", repr(CANNED))},
            },
        })  # fmt: skip
        listener = cfg["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        catch_all = routes[-1]

        def on(header: str, value: str) -> dict[str, Any]:
            return {"prefix": "/", "headers": [
                {"name": header, "string_match": {"exact": value}}]}  # fmt: skip

        routes.insert(0, {"match": on("x-route-guard", "403"), "direct_response": {
            "status": 403, "body": {"inline_string": '{"error":{"message":"no"}}'}}})  # fmt: skip
        routes.insert(0, {"match": on("x-route-guard", "200"),
                          "direct_response": {"status": 200, "body": {"inline_string": CANNED}},
                          "response_headers_to_add": [{"header": {
                              "key": "content-type", "value": "application/json"}}]})  # fmt: skip
        routes.insert(
            0, {"match": on("x-route", "dead"), "route": {**catch_all["route"], "cluster": "dead"}}
        )
        dead = {**cluster(cfg, "llm_upstream"), "name": "dead"}
        dead["load_assignment"] = {"cluster_name": "dead", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": dead_port}}}}]}]}  # fmt: skip
        cfg["static_resources"]["clusters"].append(dead)

    return mutate


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port held bound and never listened on: connections to it are refused, and
    nothing else can take it while the module runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(scope="module")
def envoy_mutate(dead_port: int) -> Mutator:
    return _mutate(dead_port)


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("holds-rsa")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, rsa: SigningKey, redis: RedisServer, authz_port: int
) -> Iterator[AuthzService]:
    with redis_service(tmp_path_factory, "holds", POLICY, rsa, redis, authz_port) as svc:
        yield svc


def counter(redis: RedisServer, user: str) -> tuple[int, int] | None:
    return day_counter(redis, ORG, "user-day", user)


def post(gw: EnvoyProcess, rsa: SigningKey, user: str, **headers: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token(rsa, user, ORG)}", **headers}
    with httpx.Client(timeout=30) as http:
        return http.post(gw.url + "/v1/chat/completions", json=BODY, headers=headers)


def released(redis: RedisServer, user: str, used: int = 0) -> None:
    """The counter exists (a hold was made) and holds nothing, ``used`` charged."""
    wait_until(lambda: counter(redis, user) == (used, 0), timeout=15,
               what=f"{user}: (used, held) == ({used}, 0), now {counter(redis, user)}")  # fmt: skip


@pytest.mark.parametrize(
    ("user", "headers", "status"),
    [
        ("lua403", {"x-lua-guard": "403"}, 403),
        ("lua200", {"x-lua-guard": "200"}, 200),
        ("route403", {"x-route-guard": "403"}, 403),
        ("route200", {"x-route-guard": "200"}, 200),
        ("upstream500", {"x-fake-status": "500"}, 500),
        ("upstream429", {"x-fake-status": "429"}, 429),
        ("refused", {"x-route": "dead"}, 503),
    ],
)
def test_local_answers_and_upstream_errors_hold_nothing(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, fake_llm: FakeLLMThread,
    user: str, headers: dict[str, str], status: int,
) -> None:  # fmt: skip
    resp = post(gw, rsa, user, **headers)
    assert resp.status_code == status, resp.text
    if status == 200:
        assert resp.json()["id"] == "guard"  # the guardrail's answer, not the model's
    released(redis, user)


def test_client_gone_before_the_upstream_answered_holds_nothing(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, fake_llm: FakeLLMThread
) -> None:
    user = "gone"
    body = json.dumps({**BODY, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\n"
        f"authorization: Bearer {token(rsa, user, ORG)}\r\nx-fake-delay-ms: 30000\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
        client.sendall(head.encode() + body)
        fake_llm.wait_in_flight(1)  # admitted, confirmed, at the upstream: no header yet
        held = counter(redis, user)
        assert held is not None and held[1] > 0
    # The client hung up. Nothing stays held, and only the prompt is charged: the
    # stream was cut before its first byte, so no output was produced (before: 55).
    wait_until(lambda: (counter(redis, user) or (0, 1))[1] == 0, timeout=15,
               what=f"{user}: nothing held, now {counter(redis, user)}")  # fmt: skip
    used, _ = counter(redis, user) or (0, 0)
    assert 0 < used < held[1], (used, held)
