"""A Check answer Envoy never used is given back; one it used is kept (authz.confirm).

Issue 10 finding 3, the last drift: on a loaded machine an answer the service sent in
time reached Envoy after its ext_authz timer fired. The client got a 503, the model
never saw the request, and the reservation stayed held for ``ttl_s`` (then charged):
205 units held after run 4 of the replicated stress series. A Check whose answer Envoy
drops looks, from the service, exactly like a Check nobody follows with an ext_proc
stream; here one is sent straight to the gRPC port, as Envoy would, and never used.

Through the real Envoy with Redis: a stream held open by the upstream is confirmed by
its ext_proc stream and stays held past ``confirm_s``, while the unused Check's hold is
released at 0; the stream then settles exactly.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import grpc
import httpx
import pytest

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests.e2e.redis_env import (  # noqa: F401  (fixtures, found by name)
    day_counter,
    gw_fixture,
    redis_fixture,
    redis_service,
)
from tests.e2e.spine_env import token
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e

ORG = "confirm"
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
reservations: {{ttl_s: 600, confirm_s: 1}}
ledger:
  breaker: {{journal_path: {journal}}}
"""
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("confirm-rsa")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, rsa: SigningKey, redis: RedisServer, authz_port: int
) -> Iterator[AuthzService]:
    with redis_service(tmp_path_factory, "confirm", POLICY, rsa, redis, authz_port) as svc:
        yield svc


def counter(redis: RedisServer, user: str) -> tuple[int, int] | None:
    return day_counter(redis, ORG, "user-day", user)


def unused_check(service: AuthzService, bearer: str) -> None:
    """A Check as Envoy sends it, whose answer then goes nowhere."""
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", raw_body=json.dumps(BODY).encode(),
        headers={"authorization": f"Bearer {bearer}", "content-type": "application/json"},
    )  # fmt: skip
    req = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(service.grpc_address) as ch:
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=10)
    assert resp.status.code == 0, resp  # allowed: a hold was made


def test_unused_answer_released_used_one_kept_then_settled_exactly(
    gw: EnvoyProcess, rsa: SigningKey, redis: RedisServer, fake_llm: FakeLLMThread,
    service: AuthzService,
) -> None:  # fmt: skip
    headers = {
        "authorization": f"Bearer {token(rsa, 'kept', ORG)}", "x-fake-hold": "kept",
        "x-fake-prompt-tokens": "40", "x-fake-words": "7",
    }  # fmt: skip
    result: dict[str, object] = {}

    def stream() -> None:
        with httpx.Client(timeout=60) as http:
            body = {**BODY, "stream": True}
            with http.stream("POST", gw.url + "/v1/chat/completions", json=body,
                             headers=headers) as resp:  # fmt: skip
                result["status"] = resp.status_code
                result["body"] = b"".join(resp.iter_bytes())

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        fake_llm.wait_in_flight(1)  # past ext_proc's request phase: its hold is confirmed
        held = counter(redis, "kept")
        assert held is not None and held[0] == 0 and held[1] > 0
        unused_check(service, token(rsa, "dropped", ORG))
        dropped = counter(redis, "dropped")
        assert dropped is not None and dropped[1] > 0
        # Released at 0 once confirm_s (1 s) passed and the sweep ran (before: held 600 s).
        wait_until(lambda: counter(redis, "dropped") == (0, 0), timeout=30,
                   what="the unused Check's hold released")  # fmt: skip
        # The used one's tentative deadline came earlier, and it is still held.
        assert counter(redis, "kept") == held
    finally:
        fake_llm.release("kept")
        streaming.join(timeout=60)
    assert result["status"] == 200
    record = fake_llm.wait_records(1)[0]
    reported = record.prompt_tokens + record.output_tokens
    assert reported == 47 and record.usage_reported
    wait_until(lambda: counter(redis, "kept") == (reported, 0), timeout=20,
               what="the stream settled as the upstream reported")  # fmt: skip
