"""The HTTP check API's conversions (authz/httpcheck, authz/handle_token.py): no server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.apis import Api
from authz.decision import Decision, DenyReason, Quota, Verdict
from authz.enforcer import CheckInput
from authz.envoy.convert import check_response
from authz.envoy.stream_metadata import AUTHZ_NS, labels, reservation
from authz.handle_token import MAX_TOKEN_CHARS, decode_token, encode_token
from authz.handles import Handle, HandleKeys, SettleRefusal
from authz.httpcheck.check import REMOVE_HEADER, check_request, http_answer, original_path
from authz.httpcheck.settle import BadSettle, outcome_of, parse_settle, verify
from authz.policy.bounds import BoundsSettings
from authz.policy.model import Node, SubjectPath
from authz.proto import external_processor_pb2 as pb
from authz.settle import ReservationInfo

pytestmark = pytest.mark.unit

SUBJECT = SubjectPath((Node("org", "acme"), Node("department", "ml"), Node("user", "ann")))
RID = "0123456789abcdef0123456789abcdef@acme"
H = Handle(RID, str(SUBJECT), "acme", "openai.chat", "gpt-4o", 25, 100, True, 40)
ALLOW = Decision(
    verdict=Verdict.ALLOW, subject=SUBJECT, api=Api.OPENAI_CHAT, model="gpt-4o", stream=True,
    input_estimate=25, output_reserved=100, reservation_id=RID, output_cap=40,
    quota=Quota("day", "org:acme", 1000, 875, 60.0), warnings=("soft",),
)  # fmt: skip
INP = CheckInput("POST", "/v1/chat/completions", {"x-authz-evil": "1", "x-authz-subject": "x"},
                 b"{}")  # fmt: skip


def test_token_round_trip_and_the_mac_covers_every_field() -> None:
    keys = HandleKeys.random()
    token = encode_token(H, keys.sign(H))
    found = decode_token(token)
    assert isinstance(found, tuple) and found[0] == H and keys.verify(*found) is None
    for i, value in enumerate(["x@acme", "org:acme", "evil", "openai.completions", "gpt-5",
                               26, 101, 0, 41]):  # fmt: skip
        fields = json.loads(_b64d(token.split(".")[1]))
        fields[i] = value
        altered = decode_token(f"h1.{_b64e(json.dumps(fields))}.{token.split('.')[2]}")
        assert isinstance(altered, tuple) and keys.verify(*altered) is not None, i


def _b64d(s: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _b64e(s: str) -> str:
    import base64

    return base64.urlsafe_b64encode(s.encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("junk", [
    "", "h1.", "h2.e30.00", "h1.e30.00", "h1.W10.00", "h1.!!.00", "h1." + "A" * MAX_TOKEN_CHARS,
    "h1." + _b64e('["a","b","c","nope","m",1,2,0,0]') + ".00",  # unknown api
    "h1." + _b64e('["a","b","c","openai.chat","m",-1,2,0,0]') + ".00",  # negative
    "h1." + _b64e('["a","b","c","openai.chat","m",1.5,2,0,0]') + ".00",  # fraction
    "h1." + _b64e('["a","b","c","openai.chat","m",1,2,2,0]') + ".00",  # stream 2
    "h1." + _b64e('["a","b","c","openai.chat","m",1,2,true,0]') + ".00",  # a bool
    "h1." + _b64e("[" * 5000 + "]" * 5000)[:3000] + ".00",
])  # fmt: skip
def test_decode_refuses_what_is_not_a_handle(junk: str) -> None:
    assert decode_token(junk) is SettleRefusal.MALFORMED


def test_decode_without_a_mac_is_unsigned() -> None:
    assert decode_token(encode_token(H, "")) is SettleRefusal.UNSIGNED


@given(st.text(max_size=300))
def test_decode_never_raises(text: str) -> None:
    decode_token(text)
    decode_token("h1." + text)


@pytest.mark.parametrize("raw,want", [
    ("/check/v1/chat/completions", "/v1/chat/completions"), ("/check", "/"),
    ("/check?x=1", "/?x=1"), ("/check/v1/x?y=%2F", "/v1/x?y=%2F"),
    ("/checkv1", None), ("/v1/chat/completions", None),
])  # fmt: skip
def test_original_path(raw: str, want: str | None) -> None:
    assert original_path(raw) == want


def test_check_request_is_what_envoy_sends_over_grpc() -> None:
    headers = [("Authorization", "Bearer x"), ("X-Multi", "a"), ("x-multi", "b"),
               ("Content-Length", "2"), ("Transfer-Encoding", "chunked")]  # fmt: skip
    req = check_request("POST", "/v1/chat/completions", headers, b"{}")
    http = req.attributes.request.http
    assert (http.method, http.path, http.raw_body) == ("POST", "/v1/chat/completions", b"{}")
    assert dict(http.headers) == {"authorization": "Bearer x", "x-multi": "a,b"}


def test_allow_answer_carries_the_grpc_headers_and_a_handle_that_verifies() -> None:
    keys = HandleKeys.random()
    status, headers, body = http_answer(check_response(ALLOW, INP, keys))
    assert status == 200 and body == b""
    got = dict(headers)
    assert got["x-authz-subject"] == str(SUBJECT)
    assert got["x-ratelimit-remaining-tokens"] == "875"
    assert got["x-authz-max-tokens"] == "40" and got["x-authz-budget-warning"] == "soft"
    assert got[REMOVE_HEADER] == "x-authz-evil"  # the client's; ours overwrites subject
    found = decode_token(got["x-authz-handle"])
    assert isinstance(found, tuple) and found[0] == H and keys.verify(*found) is None


def test_allow_without_keys_or_reservation_has_no_handle() -> None:
    assert "x-authz-handle" not in dict(http_answer(check_response(ALLOW, INP))[1])
    free = Decision(verdict=Verdict.ALLOW, subject=SUBJECT)
    assert "x-authz-handle" not in dict(http_answer(check_response(free, INP, HandleKeys.random()))[1])


def test_deny_answer_is_the_grpc_denied_response() -> None:
    d = Decision(Verdict.DENY, 429, DenyReason.BUDGET_EXHAUSTED, "day", "no budget",
                 subject=SUBJECT, api=Api.OPENAI_CHAT, retry_after_s=30.0,
                 quota=Quota("day", "org:acme", 1000, 0, 30.0))  # fmt: skip
    resp = check_response(d, INP, HandleKeys.random())
    status, headers, body = http_answer(resp)
    assert status == 429 and body == resp.denied_response.body.encode()
    assert headers == [(h.header.key, h.header.value) for h in resp.denied_response.headers]
    assert dict(headers)["retry-after"] == "30" and "x-authz-handle" not in dict(headers)


def _stream_request(fields: dict[str, str]) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata[AUTHZ_NS].update(fields)
    return req


def test_ext_proc_reads_the_handle_from_http_service_metadata() -> None:
    keys = HandleKeys.random()
    req = _stream_request({"x-authz-handle": encode_token(H, keys.sign(H))})
    found = reservation(req)
    assert isinstance(found, tuple) and found[0] == H and keys.verify(*found) is None
    assert labels(req) == (str(SUBJECT), "ml")
    assert reservation(_stream_request({"x-authz-handle": "junk"})) is SettleRefusal.MALFORMED
    assert labels(_stream_request({"x-authz-handle": "junk"})) == ("", "")
    assert reservation(_stream_request({"other": "x"})) is None


def _settle_headers(**over: str) -> dict[str, str]:
    base = {"x-authz-handle": "h1.a.b", "x-authz-upstream-status": "200",
            "x-authz-complete": "true"}  # fmt: skip
    return {**base, **over}


def test_parse_settle() -> None:
    req = parse_settle(_settle_headers(**{"x-authz-truncated": "TRUE",
                                          "x-authz-upstream-content-type": "text/event-stream"}))
    assert (req.status, req.complete, req.truncated, req.content_type) == (
        200, True, True, "text/event-stream")  # fmt: skip
    for bad in ({"x-authz-upstream-status": "20"}, {"x-authz-upstream-status": "\uff12\uff10\uff10"},
                {"x-authz-complete": "1"}, {"x-authz-handle": " "}):  # fmt: skip
        with pytest.raises(BadSettle):
            parse_settle(_settle_headers(**bad))


def test_verify_gives_the_department_and_refuses_a_foreign_key() -> None:
    keys = HandleKeys.random()
    ok = verify(encode_token(H, keys.sign(H)), keys)
    assert not isinstance(ok, SettleRefusal) and ok.department == "ml"
    assert ok.info.reservation_id == RID and ok.info.output_cap == 40
    other = HandleKeys.random()
    assert verify(encode_token(H, other.sign(H)), keys) is SettleRefusal.FORGED


INFO = ReservationInfo(RID, Api.OPENAI_CHAT, 25, 100, "acme", "gpt-4o")
JSON = json.dumps({"usage": {"prompt_tokens": 20, "completion_tokens": 7}}).encode()
SSE = (b'data: {"choices":[{"delta":{"content":"hello there"}}]}\n\n'
       b'data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":7}}\n\n'
       b"data: [DONE]\n\n")  # fmt: skip


@pytest.mark.parametrize("status,ct,body,complete,truncated,kind,output", [
    (200, "application/json", JSON, True, False, "settled", 7),
    (200, "text/event-stream", SSE, True, False, "settled", 7),
    (200, "text/event-stream", SSE[:60], False, False, "aborted", None),  # seen text only
    (200, "application/json", JSON[:10], False, False, "aborted", 100),  # cut JSON: reserved
    (200, "application/json", JSON, True, True, "aborted", 100),  # truncated copy: reserved
    (503, "application/json", b"{}", True, False, "released", 0),
])  # fmt: skip
async def test_outcome_follows_ext_procs_rules(
    status: int, ct: str, body: bytes, complete: bool, truncated: bool, kind: str,
    output: int | None,
) -> None:  # fmt: skip
    req = parse_settle(_settle_headers(**{
        "x-authz-upstream-status": str(status), "x-authz-upstream-content-type": ct,
        "x-authz-complete": str(complete).lower(), "x-authz-truncated": str(truncated).lower()}))
    outcome = await outcome_of(INFO, req, body, BoundsSettings())
    assert outcome.kind == kind
    if output is not None:
        assert outcome.usage.output_tokens == output
    else:
        assert outcome.usage.output_tokens > 0 and outcome.usage.input_tokens == 25
    if truncated:
        assert outcome.bound is not None and outcome.bound.reason == "copy_truncated"
