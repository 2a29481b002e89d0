"""Issue 9, finding 2: a caller who reaches the gRPC port forges ext_proc settlements.

The real ``authz serve`` process, a real gRPC client on its port, and Process streams
carrying metadata the attacker made up: a victim's reservation id (as it once reached
the upstream in ``x-authz-reservation``) with another tenant's org, altered estimates,
no MAC, a MAC from another key, or a forged upstream 500 to "release" the hold. Each
must settle nothing and be counted, and the victim's genuine settlement afterwards must
be charged exactly (not ignored as a duplicate).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from authz.proto import attribute_context_pb2, base_pb2, external_auth_pb2, external_auth_pb2_grpc
from authz.proto import external_processor_pb2 as pb
from authz.proto import external_processor_pb2_grpc as pb_grpc
from tests.e2e.spine_env import metric, wait_metric
from tests.support.service import AuthzService

pytestmark = [pytest.mark.integration]

NS = "envoy.filters.http.ext_authz"
VICTIM, ATTACKER = "sk-victim", "sk-attacker"
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: v, sha256: {hashlib.sha256(VICTIM.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
    - {{name: a, sha256: {hashlib.sha256(ATTACKER.encode()).hexdigest()}, claims: {{org_id: evil, sub: eve}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""
BUDGET = 100000
GENUINE = {"prompt_tokens": 5, "completion_tokens": 3}  # what the model really used
HUGE = {"prompt_tokens": 90000, "completion_tokens": 0}  # what the forger claims


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzService]:
    tmp = tmp_path_factory.mktemp("forged")
    (tmp / "policy.yaml").write_text(POLICY)
    with AuthzService(tmp / "policy.yaml", workdir=tmp) as s:
        yield s


def check(svc: AuthzService, key: str) -> external_auth_pb2.CheckResponse:
    body = json.dumps(
        {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", raw_body=body,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )  # fmt: skip
    req = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(svc.grpc_address) as ch:
        resp: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(ch).Check(
            req, timeout=5
        )
    assert resp.status.code == 0, resp
    return resp


def fields(resp: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    """The metadata Envoy forwards to ext_proc, as a dict to tamper with."""
    out: dict[str, Any] = {}
    for k, v in resp.dynamic_metadata.fields.items():
        kind = v.WhichOneof("kind")
        out[k] = getattr(v, kind)
    return out


def process(
    svc: AuthzService,
    meta: dict[str, object],
    status: int = 200,
    usage: dict[str, int] | None = None,
) -> list[pb.ProcessingResponse]:
    """One ext_proc stream as Envoy would send it, with ``meta`` as the ext_authz metadata."""
    s = struct_pb2.Struct()
    s.update(meta)
    headers = [
        base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    ]
    body = json.dumps({"usage": usage or GENUINE}).encode()
    msgs = [
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers))
        ),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]
    for m in msgs:
        m.metadata_context.filter_metadata[NS].CopyFrom(s)
    with grpc.insecure_channel(svc.grpc_address) as ch:
        stub = pb_grpc.ExternalProcessorStub(ch)
        return list(stub.Process(iter(msgs if status < 300 else msgs[:1]), timeout=5))


def refused(svc: AuthzService, reason: str) -> float:
    return metric(svc.http_url, "authz_settle_refused_total", reason=reason)


def settled(svc: AuthzService, outcome: str) -> float:
    return metric(svc.http_url, "authz_settlements_total", outcome=outcome)


def hold(meta: dict[str, Any]) -> int:
    return int(meta["input_estimate"]) + int(meta["output_reserved"])


def spent(svc: AuthzService, key: str) -> int:
    """Tokens the key's user has used or holds: a probe Check's remaining, less its own hold."""
    probe = check(svc, key)
    headers = {h.header.key: h.header.value for h in probe.ok_response.response_headers_to_add}
    meta = fields(probe)
    released = settled(svc, "released")
    process(svc, meta, status=500)  # release the probe, genuinely
    assert (
        wait_metric(svc.http_url, "authz_settlements_total", released + 1, outcome="released")
        == released + 1
    )
    return BUDGET - hold(meta) - int(headers["x-ratelimit-remaining-tokens"])


def forge(svc: AuthzService, meta: dict[str, object], reason: str, **kw: object) -> None:
    before, settled_before = refused(svc, reason), settled(svc, "settled")
    out = process(svc, meta, **kw)  # type: ignore[arg-type]
    # The stream passes through untouched: one answer per message, no body asked for.
    assert out[0].mode_override.response_body_mode == 0  # NONE
    assert wait_metric(svc.http_url, "authz_settle_refused_total", before + 1, reason=reason) == (
        before + 1
    )
    assert settled(svc, "settled") == settled_before


def genuine_settle_counts(svc: AuthzService, meta: dict[str, object], spent_before: int) -> None:
    ok, dup = settled(svc, "settled"), settled(svc, "duplicate")
    process(svc, meta)
    assert wait_metric(svc.http_url, "authz_settlements_total", ok + 1, outcome="settled") == ok + 1
    assert settled(svc, "duplicate") == dup
    assert spent(svc, VICTIM) == spent_before + sum(GENUINE.values())


def test_forged_org_subject_or_estimates_settle_nothing(svc: AuthzService) -> None:
    before = spent(svc, VICTIM)
    real = fields(check(svc, VICTIM))
    rid = str(real["reservation_id"])  # what used to reach the upstream as a header
    theirs = fields(check(svc, ATTACKER))
    # Another tenant's subject and org on the victim's id: no MAC, then the attacker's
    # own (genuine) MAC.
    other = {**real, "subject": theirs["subject"], "org": "evil"}
    forge(svc, {k: v for k, v in other.items() if k != "mac"}, "org_mismatch", usage=HUGE)
    forge(svc, {**other, "mac": theirs["mac"]}, "org_mismatch", usage=HUGE)
    # The attacker's signed handle with only the id swapped for the victim's.
    forge(svc, {**theirs, "reservation_id": rid}, "org_mismatch", usage=HUGE)
    # The victim's own org, another user's subject or smaller estimates, the real MAC.
    forge(svc, {**real, "subject": "org:acme/user:eve"}, "forged", usage=HUGE)
    forge(svc, {**real, "input_estimate": 1, "output_reserved": 0}, "forged", usage=HUGE)
    assert spent(svc, VICTIM) == before + hold(real)  # nothing charged: still only held
    genuine_settle_counts(svc, real, before)
    process(svc, theirs)  # the attacker's own request settles normally


def test_forged_release_releases_nothing(svc: AuthzService) -> None:
    before = spent(svc, VICTIM)
    real = fields(check(svc, VICTIM))
    released = settled(svc, "released")
    # What an attacker can write knowing only the id: a plausible unsigned handle.
    unsigned = {k: v for k, v in real.items() if k != "mac"}
    forge(svc, unsigned, "unsigned", status=500)
    forge(svc, {**real, "output_reserved": 10**6}, "forged", status=500)
    assert settled(svc, "released") == released
    assert spent(svc, VICTIM) == before + hold(real)  # the hold is still there
    genuine_settle_counts(svc, real, before)


def test_missing_or_foreign_mac_is_refused_and_counted(svc: AuthzService) -> None:
    real = fields(check(svc, VICTIM))
    forge(svc, {**real, "mac": ""}, "unsigned")
    # A MAC computed the right way but under a key the service never had.
    other_key = os.urandom(32)
    fake = hmac.digest(other_key, str(real).encode(), "sha256")[:16].hex()
    forge(svc, {**real, "mac": fake}, "forged")
    forge(svc, {**real, "input_estimate": float("nan")}, "malformed")
    forge(svc, {**real, "api": "made.up"}, "malformed")
    text = svc.stderr_path.read_text()
    assert "settlement refused" in text and '"reason": "forged"' in text.replace("'", '"')
    assert str(real["mac"]) not in text and fake not in text  # no secret in the log
    process(svc, real)  # leave nothing open for the next test
