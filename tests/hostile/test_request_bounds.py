"""A hostile client's body: ambiguous keys, two output limits, a body too big (issue 9, 6, 8).

Unit tier, through the Enforcer with the memory ledger; the figures of the loop lag
under a big body come from ``python -m bench looplag``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

import authz.enforcer
from authz.apis import Api
from authz.clock import FakeClock
from authz.decision import DenyReason, Verdict
from authz.enforcer import CheckInput, Enforcer
from authz.errors import BodyError
from authz.estimate import RequestEstimate, estimate_request
from authz.ledger import MemoryLedger
from authz.mutate.request import with_include_usage
from authz.policy.store import PolicyStore

pytestmark = [pytest.mark.unit]
KEY = "k-alice"


def _enforcer(tmp_path: Path, extra: str = "") -> Enforcer:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path = tmp_path / "p.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {digest}, claims: {{org_id: acme, sub: alice}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets: [{{name: org, match: {{org: acme}}, tokens: 100000000, period: day}}]
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
{extra}
""")
    clock = FakeClock()
    return Enforcer(PolicyStore(path), MemoryLedger(clock), clock)


def check(raw: bytes) -> CheckInput:
    return CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, raw)


@pytest.mark.parametrize(
    "raw",
    [
        # top level: we would read 10, an upstream taking the first reads 100000
        b'{"model":"gpt-4o","max_tokens":100000,"max_tokens":10,"messages":[]}',
        # nested: the first content is the long one
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"x" * 4000
        + b'","content":"hi"}]}',
        b'{"model":"gpt-4o","model":"gpt-4o","messages":[]}',
        b'{"model":"gpt-4o","stream_options":{"include_usage":false,"include_usage":true},'
        b'"messages":[]}',
    ],
    ids=["max_tokens", "content", "same-value", "deep"],
)
async def test_duplicate_keys_anywhere_are_refused(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(BodyError, match="duplicate key"):
        estimate_request(Api.OPENAI_CHAT, raw)
    d = await _enforcer(tmp_path).check(check(raw))
    assert (d.verdict, d.status, d.reason) == (Verdict.DENY, 400, DenyReason.BAD_REQUEST)
    assert "duplicate key" in d.message


@pytest.mark.parametrize(
    ("api", "limits", "want"),
    [
        (Api.OPENAI_CHAT, {"max_tokens": 5000, "max_completion_tokens": 10}, 5000),
        (Api.OPENAI_CHAT, {"max_tokens": 10, "max_completion_tokens": 5000}, 5000),
        (Api.OPENAI_CHAT, {"max_tokens": 10, "max_output_tokens": 7000}, 7000),
        (Api.OPENAI_RESPONSES, {"max_output_tokens": 10, "max_tokens": 900}, 900),
        (Api.ANTHROPIC_MESSAGES, {"max_tokens": 10, "max_completion_tokens": 800}, 800),
        (Api.OPENAI_COMPLETIONS, {"max_tokens": 3, "max_completion_tokens": 4}, 4),
    ],
)
def test_the_largest_output_limit_is_reserved(
    api: Api, limits: dict[str, int], want: int
) -> None:
    body: dict[str, object] = {"model": "gpt-4o", **limits}
    if api is Api.OPENAI_RESPONSES:
        body["input"] = "hi"
    elif api is Api.OPENAI_COMPLETIONS:
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    assert estimate_request(api, json.dumps(body).encode()).max_output_tokens == want


async def test_a_body_over_the_cap_is_handled_as_truncated(tmp_path: Path) -> None:
    """Bigger than Envoy forwards (bounds.request_body_bytes): never parsed."""
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 4096}]})
    enforcer = _enforcer(tmp_path, "bounds: {request_body_bytes: 2048}")
    d = await enforcer.check(check(big.encode()))
    assert (d.verdict, d.status, d.detail) == (Verdict.DENY, 400, "invalid_body")
    assert "larger than the gateway forwards" in d.message
    reserve = _enforcer(tmp_path, "bounds: {request_body_bytes: 2048}\n"
                        "requests: {bad_body: {reserve_tokens: 777}}")  # fmt: skip
    d = await reserve.check(check(big.encode()))
    assert d.verdict is Verdict.ALLOW and d.input_estimate == 777


async def test_a_big_body_is_estimated_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []

    def spy(api: Api, body: bytes) -> RequestEstimate:
        threads.append(threading.get_ident())
        return estimate_request(api, body)

    monkeypatch.setattr(authz.enforcer, "estimate_request", spy)
    enforcer = _enforcer(tmp_path)
    small = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    msgs = [{"role": "user", "content": "a"}] * 30_000  # ~900 KB of tiny messages
    big = json.dumps({"model": "gpt-4o", "messages": msgs})
    assert (await enforcer.check(check(small.encode()))).allowed
    d = await enforcer.check(check(big.encode()))
    assert d.allowed and d.input_estimate == 30_000 * 4 + 30_000 // 4
    assert threads[0] == threading.get_ident() != threads[1]


def test_include_usage_rewrite_leaves_oversized_bodies_alone() -> None:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    assert with_include_usage(json.dumps(body).encode()) is not None
    body["messages"] = [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]
    assert with_include_usage(json.dumps(body).encode()) is None


def test_check_config_names_caps_that_disagree_with_envoy(tmp_path: Path) -> None:
    """The shipped pair agrees; raising Envoy's caps alone is named, with the fix."""
    from authz.policy.envoy_check import envoy_warnings
    from authz.policy.loader import load_policy

    root = Path(__file__).parent.parent.parent
    policy = load_policy(root / "examples" / "policy.yaml")
    shipped = root / "envoy" / "envoy.yaml"
    assert envoy_warnings(policy, shipped) == []
    text = shipped.read_text()
    text = text.replace("max_request_bytes: 1048576", "max_request_bytes: 4194304")
    text = text.replace("per_connection_buffer_limit_bytes: 16777216",
                        "per_connection_buffer_limit_bytes: 33554432")  # fmt: skip
    raised = tmp_path / "envoy.yaml"
    raised.write_text(text)
    warnings = envoy_warnings(policy, raised)
    assert len(warnings) == 2
    assert "raise bounds.request_body_bytes to 4194304" in warnings[0]
    assert "raise it to 34603008" in warnings[1]
