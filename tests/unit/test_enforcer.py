from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.decision import DenyReason, Verdict
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit


def _policy(tmp_path: Path, extra: str = "") -> Path:
    def key(k: str) -> str:
        return hashlib.sha256(k.encode()).hexdigest()

    text = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: alice, sha256: {key("k-alice")}, claims: {{org_id: acme, department: research, sub: alice}}}}
    - {{name: bob, sha256: {key("k-bob")}, claims: {{org_id: acme, department: research, sub: bob}}}}
    - {{name: nobody, sha256: {key("k-noorg")}, claims: {{sub: carol}}}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: user, claim: sub}}]
weights: {{input: 1, output: 2}}
budgets:
  - {{name: org-day, match: {{org: acme}}, tokens: 1000, period: day}}
  - {{name: user-day, match: {{user: "*"}}, tokens: 600, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
{extra}
"""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def req(
    key: str,
    body: object | None = None,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    raw: bytes | None = None,
) -> CheckInput:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    return CheckInput(method, path, {"authorization": f"Bearer {key}"}, data)


def chat(max_tokens: int | None = None, text: str = "x" * 40) -> dict[str, object]:
    body: dict[str, object] = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


@pytest.fixture
def make(tmp_path: Path):  # type: ignore[no-untyped-def]
    def build(extra: str = "") -> tuple[Enforcer, MemoryLedger, FakeClock]:
        clock = FakeClock()
        ledger = MemoryLedger(clock)
        return Enforcer(PolicyStore(_policy(tmp_path, extra)), ledger, clock), ledger, clock

    return build


async def test_allow_reserves_input_plus_max_output(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-alice", chat(max_tokens=100)))
    assert d.verdict is Verdict.ALLOW and d.reservation_id
    assert str(d.subject) == "org:acme/department:research/user:alice"
    assert d.output_reserved == 100 and d.input_estimate > 0
    units = d.input_estimate + 2 * 100  # output weighs 2
    assert d.quota is not None and d.quota.budget == "user-day" and d.quota.remaining == 600 - units


async def test_default_output_from_model_rule(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-alice", chat()))
    assert d.output_reserved == 50


async def test_user_budget_exhausted_names_budget(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    for _ in range(2):  # ~2 x 300 units: the user's 600 is gone, the org's 1000 is not
        assert (await enf.check(req("k-alice", chat(max_tokens=140)))).allowed
    d = await enf.check(req("k-alice", chat(max_tokens=140)))
    assert d.verdict is Verdict.DENY and d.status == 429
    assert d.reason is DenyReason.BUDGET_EXHAUSTED and d.detail == "user-day"
    assert "user-day" in d.message and "org:acme/department:research/user:alice" in d.message
    assert d.quota is not None and d.quota.reset_after_s == pytest.approx(86400)


async def test_org_budget_blocks_user_with_room(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    assert (await enf.check(req("k-alice", chat(max_tokens=250)))).allowed  # ~510 units
    assert not (await enf.check(req("k-alice", chat(max_tokens=250)))).allowed
    d = await enf.check(req("k-bob", chat(max_tokens=250)))  # bob's own budget is untouched
    assert d.reason is DenyReason.BUDGET_EXHAUSTED and d.detail == "org-day"


async def test_settle_replaces_reservation(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-alice", chat(max_tokens=250)))
    assert d.reservation_id
    assert await enf.settle(d.reservation_id, TokenUsage(10, 0, 5))
    assert not await enf.settle(d.reservation_id, TokenUsage(10, 0, 5))
    d2 = await enf.check(req("k-alice", chat(max_tokens=250)))
    assert d2.allowed and d2.quota is not None
    assert d2.quota.remaining == 600 - 20 - (d2.input_estimate + 500)


async def test_release_refunds_everything(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-alice", chat(max_tokens=250)))
    assert d.reservation_id and await enf.release(d.reservation_id)
    d2 = await enf.check(req("k-alice", chat(max_tokens=250)))
    assert d2.allowed


async def test_expiry_charges_input_estimate(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, clock = make()
    d = await enf.check(req("k-alice", chat(max_tokens=250)))
    clock.advance(601)
    assert await enf.expire_overdue() == 1
    d2 = await enf.check(req("k-alice", chat(max_tokens=10)))
    assert d2.quota is not None
    assert d2.quota.remaining == 600 - d.input_estimate - (d2.input_estimate + 20)


async def test_budget_resets_at_day_boundary(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, clock = make()
    d = await enf.check(req("k-alice", chat(max_tokens=280)))
    assert d.reservation_id
    await enf.settle(d.reservation_id, TokenUsage(100, 0, 240))
    assert not (await enf.check(req("k-alice", chat(max_tokens=100)))).allowed
    clock.advance(86400)
    assert (await enf.check(req("k-alice", chat(max_tokens=100)))).allowed


async def test_identity_and_subject_denials(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-wrong", chat()))
    assert (d.status, d.reason, d.detail) == (401, DenyReason.UNAUTHENTICATED, "unknown_api_key")
    assert "k-wrong" not in d.message
    d = await enf.check(CheckInput("POST", "/v1/chat/completions", {}, b"{}"))
    assert (d.status, d.detail) == (401, "missing_credential")
    d = await enf.check(req("k-noorg", chat()))
    assert (d.status, d.reason) == (403, DenyReason.SUBJECT_UNMAPPED)


async def test_unknown_model_denied_never_free(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    body = chat(max_tokens=5)
    body["model"] = "llama-3"
    d = await enf.check(req("k-alice", body))
    assert (d.status, d.reason) == (400, DenyReason.UNKNOWN_MODEL)
    enf2, _, _ = make("")
    assert enf2 is not enf


async def test_unknown_model_default_reserves(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    path.write_text(
        path.read_text().replace(
            'rules: [{match: "gpt-*", max_output_tokens: 50}]',
            'rules: [{match: "gpt-*", max_output_tokens: 50}]\n  unknown: {max_output_tokens: 77}',
        )
    )
    clock = FakeClock()
    enf = Enforcer(PolicyStore(path), MemoryLedger(clock), clock)
    body = chat()
    body["model"] = "llama-3"
    d = await enf.check(req("k-alice", body))
    assert d.allowed and d.output_reserved == 77


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"model": "gpt-4o", "messages": [', b"[]"])
async def test_bad_body_denied_400(make, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-alice", raw=raw))
    assert (d.status, d.reason) == (400, DenyReason.BAD_REQUEST) and d.message


async def test_bad_body_reserve_policy(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make("requests: {bad_body: {reserve_tokens: 123}}")
    d = await enf.check(req("k-alice", raw=b"garbage"))
    assert d.allowed and d.input_estimate == 123 and d.reservation_id


async def test_other_paths(make) -> None:  # type: ignore[no-untyped-def]
    enf, _, _ = make()
    d = await enf.check(req("k-alice", path="/v1/models", method="GET"))
    assert d.allowed and d.reservation_id is None
    enf2, _, _ = make("requests: {other_paths: deny}")
    d = await enf2.check(req("k-alice", path="/v1/models", method="GET"))
    assert (d.status, d.reason) == (403, DenyReason.PATH_NOT_ALLOWED)


async def test_reload_changes_budgets_and_bad_reload_keeps_last_good(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    clock = FakeClock()
    store = PolicyStore(path)
    enf = Enforcer(store, MemoryLedger(clock), clock)
    path.write_text(path.read_text().replace("tokens: 600", "tokens: 60"))
    assert store.reload()
    assert not (await enf.check(req("k-alice", chat(max_tokens=100)))).allowed
    path.write_text("version: 1\nbudgets: nope\n")
    assert not store.reload() and store.reload_failures == 1
    assert enf.policy.budgets[1].tokens == 60
