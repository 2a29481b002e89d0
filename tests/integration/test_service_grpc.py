"""The real `authz serve` process over gRPC (no Envoy): Check, health, reflection, reloads."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests.support.service import AuthzService

pytestmark = pytest.mark.integration

KEY = "sk-integration"
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: it, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: TOKENS, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""


def write(path: Path, tokens: int) -> None:
    path.write_text(POLICY.replace("TOKENS", str(tokens)))


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[AuthzService]:
    write(tmp_path / "policy.yaml", 1000)
    with AuthzService(tmp_path / "policy.yaml", workdir=tmp_path) as s:
        yield s


def check(svc: AuthzService, max_tokens: int = 10) -> external_auth_pb2.CheckResponse:
    body = json.dumps(
        {
            "model": "gpt-4o",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path="/v1/chat/completions",
        raw_body=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    req = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(svc.grpc_address) as ch:
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def limit_header(resp: external_auth_pb2.CheckResponse) -> str:
    headers = resp.ok_response.response_headers_to_add or resp.denied_response.headers
    return next(h.header.value for h in headers if h.header.key == "x-ratelimit-limit-tokens")


def wait_for(pred, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_check_allow_and_metadata(svc: AuthzService) -> None:
    resp = check(svc)
    assert resp.status.code == 0 and resp.HasField("ok_response")
    meta = resp.dynamic_metadata.fields
    assert meta["subject"].string_value == "org:acme/user:ann"
    assert meta["reservation_id"].string_value.endswith("@acme")
    assert meta["model"].string_value == "gpt-4o"
    assert limit_header(resp) == "1000"


def test_health_and_reflection(svc: AuthzService) -> None:
    with grpc.insecure_channel(svc.grpc_address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in (
            "",
            "envoy.service.auth.v3.Authorization",
            "envoy.service.ext_proc.v3.ExternalProcessor",
        ):
            out = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert out.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(
            iter(
                refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
        )
        names = {s.name for s in reply.list_services_response.service}
    assert {
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    } <= names


def test_reload_on_sighup_and_bad_reload_keeps_last_good(svc: AuthzService, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write(policy, 5000)
    svc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: limit_header(check(svc)) == "5000")
    policy.write_text("version: 1\nbudgets: [oops\n")
    svc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "keeping the last good policy" in svc.stderr_path.read_text())
    assert limit_header(check(svc)) == "5000"
    assert f"{policy}: is not valid YAML" in svc.stderr_path.read_text()


def test_reload_on_file_change(svc: AuthzService, tmp_path: Path) -> None:
    write(tmp_path / "policy.yaml", 7777)
    assert wait_for(lambda: limit_header(check(svc)) == "7777")


def test_bad_policy_at_start_exits_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("TOKENS", "-1"))
    svc = AuthzService(bad, workdir=tmp_path)
    with pytest.raises(
        Exception, match=r"budgets\[0\]\.tokens: must be an integer >= 1 \(got -1\)"
    ):
        svc.start()
