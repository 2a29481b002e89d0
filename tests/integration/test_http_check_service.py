"""The HTTP check API on the real `authz serve` process (no gateway): the same answers
as the gRPC Check, the queue, a caller that leaves, settlement rules, drain, port use."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests.e2e.spine_env import metric, wait_metric
from tests.support.procs import wait_until
from tests.support.service import REPO_ROOT, AuthzService

pytestmark = pytest.mark.integration


def _key(name: str) -> str:
    return f"sk-{name}"


def _entry(name: str, team: str) -> str:
    digest = hashlib.sha256(_key(name).encode()).hexdigest()
    return f"    - {{name: {name}, sha256: {digest}, claims: {{org_id: acme, sub: {name}, team: {team}}}}}"


POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
{_entry("grpc", "big")}
{_entry("http", "big")}
{_entry("small", "small")}
{_entry("solo", "solo")}
subject:
  org: {{claim: org_id}}
  team: {{claim: team}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000, period: day}}
  - {{name: small-day, match: {{team: small}}, tokens: 30, period: day}}
rates:
  - {{name: solo-conc, match: {{team: solo}}, concurrent: 1}}
queue:
  max_wait_s: 8
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""
BODY = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzService]:
    tmp = tmp_path_factory.mktemp("httpcheck")
    (tmp / "policy.yaml").write_text(POLICY)
    with AuthzService(tmp / "policy.yaml", workdir=tmp) as s:
        yield s


def http_check(svc: AuthzService, who: str, body: object = BODY, path: str = "/v1/chat/completions",
               **headers: str) -> httpx.Response:  # fmt: skip
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=svc.check_http_url, timeout=20) as c:
        return c.post("/check" + path, content=raw, headers={
            "authorization": f"Bearer {_key(who)}", "content-type": "application/json", **headers})


def grpc_check(svc: AuthzService, who: str, body: object = BODY,
               path: str = "/v1/chat/completions") -> external_auth_pb2.CheckResponse:  # fmt: skip
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path=path, raw_body=raw,
        headers={"authorization": f"Bearer {_key(who)}", "content-type": "application/json"},
    )  # fmt: skip
    req = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(svc.grpc_address) as ch:
        resp: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(
            ch
        ).Check(req, timeout=20)
        return resp


def settle(svc: AuthzService, handle: str, body: bytes, status: int = 200,
           content_type: str = "application/json", **flags: str) -> httpx.Response:  # fmt: skip
    headers = {"x-authz-handle": handle, "x-authz-upstream-status": str(status),
               "x-authz-upstream-content-type": content_type, "x-authz-complete": "true"}
    headers.update({k.replace("_", "-"): v for k, v in flags.items()})
    with httpx.Client(base_url=svc.check_http_url, timeout=20) as c:
        return c.post("/settle", content=body, headers=headers)


def usage_body(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}  # fmt: skip
    return json.dumps({"object": "chat.completion", "choices": [], "usage": usage}).encode()


def sse_body(words: int, usage: bool) -> bytes:
    out = b""
    for _ in range(words):
        chunk = {"object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": "word "}}]}  # fmt: skip
        out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
    if usage:
        last = {"object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": words,
                          "total_tokens": 9 + words}}  # fmt: skip
        out += b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"
    return out


def _grpc_headers(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    if resp.HasField("denied_response"):
        return {h.header.key: h.header.value for h in resp.denied_response.headers}
    ok = resp.ok_response
    out = {h.header.key: h.header.value for h in ok.headers}
    out.update({h.header.key: h.header.value for h in ok.response_headers_to_add})
    return out


@pytest.mark.parametrize(
    "who,body,path",
    [
        ("{}", BODY, "/v1/chat/completions"),  # allowed
        ("nobody", BODY, "/v1/chat/completions"),  # 401
        ("{}", b"{not json", "/v1/chat/completions"),  # 400
        ("{}", {**BODY, "model": "llama"}, "/v1/chat/completions"),  # unknown model
        ("{}", BODY, "/v1/unknown"),  # path not allowed
    ],
    ids=["allow", "unauthenticated", "bad-body", "unknown-model", "path"],
)
def test_same_answers_as_the_grpc_check(svc: AuthzService, who: str, body: object,
                                        path: str) -> None:  # fmt: skip
    by_grpc = grpc_check(svc, who.format("grpc"), body, path)
    by_http = http_check(svc, who.format("http"), body, path)
    headers = {k: v for k, v in by_http.headers.items() if k not in ("content-length", "date",
                                                                     "server")}  # fmt: skip
    handle = headers.pop("x-authz-handle", None)
    if by_grpc.HasField("denied_response"):
        denied = by_grpc.denied_response
        assert by_http.status_code == denied.status.code != 200
        assert by_http.content == denied.body.encode()
        assert handle is None
    else:
        assert by_http.status_code == 200 and by_http.content == b""
        assert handle is not None and handle.startswith("h1.")
    expected = _grpc_headers(by_grpc)
    # The subject names the caller: the two protocols were called by different users.
    if "x-authz-subject" in expected:
        expected["x-authz-subject"] = expected["x-authz-subject"].replace("grpc", "http")
    if "x-ratelimit-reset-tokens" in expected:  # a duration that may tick between the calls
        headers.pop("x-ratelimit-reset-tokens")
        expected.pop("x-ratelimit-reset-tokens")
    assert headers == expected


def test_client_x_authz_headers_are_named_for_removal(svc: AuthzService) -> None:
    resp = http_check(svc, "http", **{"x-authz-subject": "org:evil", "x-authz-handle": "h1.x.y"})
    assert resp.status_code == 200
    removed = set(resp.headers["x-envoy-auth-headers-to-remove"].split(","))
    assert removed == {"x-authz-handle"}  # x-authz-subject is overwritten by ours
    assert resp.headers["x-authz-subject"] == "org:acme/team:big/user:http"


def test_settle_json_exactly_sse_abort_truncated_and_upstream_error(svc: AuthzService) -> None:
    def reserve() -> str:
        resp = http_check(svc, "http")
        assert resp.status_code == 200, resp.text
        return resp.headers["x-authz-handle"]

    outcomes = {k: metric(svc.http_url, "authz_settlements_total", outcome=k)
                for k in ("settled", "aborted", "estimated", "released")}  # fmt: skip
    out_tokens = metric(svc.http_url, "authz_tokens_total", org="acme", kind="output")
    assert settle(svc, reserve(), usage_body(9, 4)).status_code == 204
    stream = "text/event-stream"
    assert settle(svc, reserve(), sse_body(3, usage=True), content_type=stream).status_code == 204
    # The client left mid-stream: charged from what was seen (never zero), as ext_proc does.
    cut = settle(svc, reserve(), sse_body(2, usage=False), content_type=stream,
                 x_authz_complete="false")  # fmt: skip
    assert cut.status_code == 204
    # The gateway's copy stopped at its limit: the reservation is charged.
    assert settle(svc, reserve(), usage_body(9, 4)[:20], x_authz_truncated="true").status_code == 204
    assert settle(svc, reserve(), b'{"error": {}}', status=500).status_code == 204
    after = {k: metric(svc.http_url, "authz_settlements_total", outcome=k) for k in outcomes}
    assert {k: after[k] - outcomes[k] for k in outcomes} == {
        "settled": 2, "aborted": 2, "estimated": 0, "released": 1}  # fmt: skip
    # 4 + 3 exactly as reported, 10 (the reservation) for the truncated copy, and the
    # cut stream's two words estimated: something, never zero.
    cut_output = metric(svc.http_url, "authz_tokens_total", org="acme", kind="output") - (
        out_tokens + 4 + 3 + 10)  # fmt: skip
    assert 1 <= cut_output <= 10
    assert metric(svc.http_url, "authz_settlement_bounds_total", reason="copy_truncated") == 1


@pytest.mark.parametrize(
    "headers,why",
    [
        ({"x-authz-upstream-status": "200"}, "x-authz-handle is required"),
        ({"x-authz-handle": "h1.a.b"}, "x-authz-upstream-status must be"),
        ({"x-authz-handle": "h1.a.b", "x-authz-upstream-status": "200"}, "x-authz-complete"),
        ({"x-authz-handle": "h1.a.b", "x-authz-upstream-status": "200",
          "x-authz-complete": "yes"}, "x-authz-complete must be true or false"),
    ],
)  # fmt: skip
def test_settle_bad_input_is_400(svc: AuthzService, headers: dict[str, str], why: str) -> None:
    with httpx.Client(base_url=svc.check_http_url, timeout=20) as c:
        resp = c.post("/settle", content=b"{}", headers=headers)
    assert resp.status_code == 400 and why in resp.text


async def test_queued_check_is_admitted_when_the_slot_is_settled(svc: AuthzService) -> None:
    async with httpx.AsyncClient(base_url=svc.check_http_url, timeout=20) as c:
        auth = {"authorization": f"Bearer {_key('solo')}"}
        first = await c.post("/check/v1/chat/completions", json=BODY, headers=auth)
        assert first.status_code == 200
        queued = asyncio.create_task(c.post("/check/v1/chat/completions", json=BODY, headers=auth))
        await asyncio.sleep(0)
        depth = await asyncio.to_thread(wait_metric, svc.http_url, "authz_queue_depth", 1, 10.0)
        assert depth == 1 and not queued.done()  # held by admission control, as over gRPC
        done = await c.post("/settle", content=usage_body(9, 2), headers={
            "x-authz-handle": first.headers["x-authz-handle"], "x-authz-upstream-status": "200",
            "x-authz-upstream-content-type": "application/json", "x-authz-complete": "true"})
        assert done.status_code == 204
        second = await queued
        assert second.status_code == 200
        await c.post("/settle", content=usage_body(9, 2), headers={
            "x-authz-handle": second.headers["x-authz-handle"], "x-authz-upstream-status": "200",
            "x-authz-upstream-content-type": "application/json", "x-authz-complete": "true"})


async def test_a_caller_that_leaves_mid_check_gets_its_reservation_released(
    svc: AuthzService,
) -> None:
    auth = {"authorization": f"Bearer {_key('solo')}"}
    async with httpx.AsyncClient(base_url=svc.check_http_url, timeout=20) as c:
        first = await c.post("/check/v1/chat/completions", json=BODY, headers=auth)
        assert first.status_code == 200
        # A second caller queues, then goes away (its connection closes) before the slot
        # frees: the decision that follows must not keep the slot for nobody.
        leaving = asyncio.create_task(c.post("/check/v1/chat/completions", json=BODY,
                                             headers=auth))  # fmt: skip
        await asyncio.to_thread(wait_metric, svc.http_url, "authz_queue_depth", 1, 10.0)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        release = {"x-authz-handle": first.headers["x-authz-handle"],
                   "x-authz-upstream-status": "500", "x-authz-complete": "true"}  # fmt: skip
        assert (await c.post("/settle", content=b"", headers=release)).status_code == 204
        # The left caller's reservation was made once the slot freed, then released: the
        # slot is free again, and a third caller is admitted without waiting.
        await asyncio.to_thread(lambda: wait_until(
            lambda: metric(svc.http_url, "authz_queue_depth") == 0, timeout=10, what="queue empty"))
        third = await c.post("/check/v1/chat/completions", json=BODY, headers=auth,
                             timeout=2.0)  # fmt: skip
        assert third.status_code == 200
        release["x-authz-handle"] = third.headers["x-authz-handle"]
        await c.post("/settle", content=b"", headers=release)


def test_an_answer_past_the_gateways_deadline_is_released(svc: AuthzService) -> None:
    # Envoy's http_service client says how long it waits; a decision with (nearly) none of
    # that left is answered 504 and released, as a gRPC answer past its deadline is.
    for _ in range(4):  # 4 reservations held would be twice the team's 30 tokens
        late = http_check(svc, "small", **{"x-envoy-expected-rq-timeout-ms": "1"})
        assert late.status_code == 504
    # Releases run just after the answer: the budget is whole again at once or shortly.
    ok = wait_until(lambda: (r := http_check(svc, "small")).status_code == 200 and r,
                    timeout=10, what="the small team's budget released")  # fmt: skip
    assert ok and int(ok.headers["x-ratelimit-remaining-tokens"]) >= 30 - 2 * 15


def test_oversized_check_body_is_a_truncated_body(svc: AuthzService) -> None:
    big = json.dumps({**BODY, "messages": [{"role": "user", "content": "x" * (1 << 21)}]})
    by_http = http_check(svc, "http", big.encode())
    by_grpc = grpc_check(svc, "grpc", big[: (1 << 20) + 1].encode())
    assert by_http.status_code == by_grpc.denied_response.status.code == 400
    assert by_http.content == by_grpc.denied_response.body.encode()


def test_port_in_use_is_one_line_and_exit_3(tmp_path: Path, svc: AuthzService) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = AuthzService(tmp_path / "policy.yaml", workdir=tmp_path, check_http_port=port)
        done = subprocess.run(other.command(), cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60, env={"AUTHZ_STATE_DIR": str(tmp_path),
                                               **_env()})  # fmt: skip
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        f"authz: the HTTP check address 127.0.0.1:{port} is already in use"
        " (another authz, or another program, listens there)"
    ]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")} | {
        "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip


async def test_sigterm_drains_an_in_flight_check(tmp_path: Path) -> None:
    # A Check held by the queue (max_wait 3 s here) when SIGTERM comes still gets its
    # answer: the listener closes, requests in flight finish within the grace period.
    (tmp_path / "policy.yaml").write_text(POLICY.replace("max_wait_s: 8", "max_wait_s: 3"))
    async with AuthzService(tmp_path / "policy.yaml", workdir=tmp_path) as own:
        auth = {"authorization": f"Bearer {_key('solo')}"}
        async with httpx.AsyncClient(base_url=own.check_http_url, timeout=20) as c:
            first = await c.post("/check/v1/chat/completions", json=BODY, headers=auth)
            assert first.status_code == 200
            held = asyncio.create_task(c.post("/check/v1/chat/completions", json=BODY,
                                              headers=auth))  # fmt: skip
            await asyncio.to_thread(wait_metric, own.http_url, "authz_queue_depth", 1, 10.0)
            own.send_signal(signal.SIGTERM)
            await asyncio.to_thread(lambda: wait_until(
                lambda: own.http_get("/readyz")[0] == 503, timeout=10, what="not ready"))
            assert not held.done()  # still waiting in the queue while the service stops
            answer = await held  # answered (the queue's 429), not cut off
            assert answer.status_code == 429 and answer.headers["x-authz-reason"] == "rate_limited"
        assert await asyncio.to_thread(own.wait, 20.0) == 0
