"""The body the HTTP check hands a gateway without ext_proc (authz/httpcheck/rewrite.py):
ext_proc's own rewrite (authz/mutate/request.py), or the refusal of a cap it cannot
write, with the reservation released."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from authz.apis import Api
from authz.decision import Decision, DenyReason, Verdict
from authz.envoy.convert import check_response
from authz.handles import HandleKeys
from authz.httpcheck.check import http_answer
from authz.httpcheck.rewrite import (
    BODY_HEADER,
    USAGE_ADDED_HEADER,
    gateway_cut,
    plan_rewrite,
    rewrite_answer,
    wants_rewrite,
)
from authz.mutate.request import RequestChanges, rewrite_request
from authz.settle import ReservationInfo
from tests.unit.test_httpcheck import ALLOW, INP

pytestmark = pytest.mark.unit

INFO = ReservationInfo("r1@acme", Api.OPENAI_CHAT, 25, 100, "acme", "gpt-4o", output_cap=40)
STREAM = b'{"model":"gpt-4o","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"h\xc3\xa9"}]}'


def test_the_body_is_byte_for_byte_what_ext_proc_sends() -> None:
    plan = plan_rewrite(INFO, STREAM, True, add_stream_usage=True)
    ext_proc = rewrite_request(STREAM, Api.OPENAI_CHAT, RequestChanges(), add_usage=True, cap=40)
    assert plan is not None and plan.body == ext_proc and plan.usage_added
    sent = json.loads(plan.body or b"")
    assert sent["max_tokens"] == 40 and sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("api", "body", "field"),
    [
        (Api.OPENAI_CHAT, b'{"max_completion_tokens":900}', "max_completion_tokens"),
        (Api.OPENAI_CHAT, b"{}", "max_completion_tokens"),
        (Api.OPENAI_RESPONSES, b'{"input":"x"}', "max_output_tokens"),
        (Api.ANTHROPIC_MESSAGES, b'{"max_tokens":4096}', "max_tokens"),
    ],
)
def test_each_api_gets_its_own_field(api: Api, body: bytes, field: str) -> None:
    plan = plan_rewrite(replace(INFO, api=api), body, True, add_stream_usage=True)
    assert plan is not None and json.loads(plan.body or b"")[field] == 40
    assert not plan.usage_added


def test_nothing_to_change_is_unchanged() -> None:
    plan = plan_rewrite(replace(INFO, output_cap=0), b'{"max_tokens":5}', True, True)
    assert plan is not None and plan.body is None and not plan.usage_added
    asked = b'{"stream":true,"stream_options":{"include_usage":true},"max_tokens":10}'
    plan = plan_rewrite(INFO, asked, True, True)  # under the cap, usage asked by the client
    assert plan is not None and plan.body is None and not plan.usage_added


@pytest.mark.parametrize("body", [b"not json", b"[1]", b"\xff{"])
def test_a_cap_the_body_cannot_carry_is_refused(body: bytes) -> None:
    assert plan_rewrite(INFO, body, True, True) is None


def test_a_cut_body_is_never_rewritten() -> None:
    assert plan_rewrite(INFO, STREAM[:30], False, True) is None  # the cap cannot be written
    plan = plan_rewrite(replace(INFO, output_cap=0), STREAM[:30], False, True)
    assert plan is not None and plan.body is None and not plan.usage_added


def test_headers() -> None:
    assert wants_rewrite({"x-authz-rewrite-body": "True "})
    assert not wants_rewrite({})
    assert gateway_cut({"x-envoy-auth-partial-body": "true"}) and not gateway_cut({})


async def test_answer_carries_the_body_or_the_refusal_and_release() -> None:
    released: list[str] = []

    async def release(info: ReservationInfo) -> None:
        released.append(info.reservation_id)

    allow = http_answer(check_response(ALLOW, INP, HandleKeys.random()))
    status, headers, body = await rewrite_answer(allow, STREAM, True, True, release)
    got = dict(headers)
    assert status == 200 and got[BODY_HEADER] == "rewritten" and got[USAGE_ADDED_HEADER] == "true"
    assert json.loads(body)["max_tokens"] == 40 and "x-authz-handle" in got
    assert released == []

    status, headers, body = await rewrite_answer(allow, b"<xml/>", True, True, release)
    assert status == 429 and released == [ALLOW.reservation_id]
    got = dict(headers)
    assert got["x-authz-reason"] and got["x-authz-max-tokens"] == "40"
    assert "x-authz-handle" not in got
    assert json.loads(body)["error"]["type"] == "insufficient_quota"

    denied = Decision(Verdict.DENY, 429, DenyReason.BUDGET_EXHAUSTED, "day", "no budget",
                      api=Api.OPENAI_CHAT)  # fmt: skip
    deny = http_answer(check_response(denied, INP))
    assert await rewrite_answer(deny, STREAM, True, True, release) == deny
