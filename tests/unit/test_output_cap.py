"""Admit what fits (issue 10, #2), without Envoy: the cap's arithmetic, the enforcer's
decision, the policy keys, the body rewrite, the signed handle and ext_proc's refusal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import struct_pb2

from authz.apis import Api
from authz.clock import FakeClock
from authz.decision import DenyReason
from authz.enforcer import CheckInput, Enforcer
from authz.envoy.convert import check_response, metadata_fields
from authz.envoy.extproc import ExternalProcessorServicer
from authz.errors import PolicyError
from authz.handles import Handle, HandleKeys, SettleRefusal
from authz.ledger import Limit, MemoryLedger
from authz.mutate.request import CapUnwritable, RequestChanges, rewrite_request
from authz.output_cap import largest_output
from authz.policy.loader import parse_policy
from authz.policy.model import Weights
from authz.policy.store import PolicyStore
from authz.proto import external_processor_pb2 as pb
from authz.telemetry.metrics import Metrics
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit
KEYS = HandleKeys.random()


def _limit(amount: int, weights: Weights, per_request: int = 0) -> Limit:
    return Limit("b|u|0", "b", "u", amount, 1e12, weights, per_request=per_request)


# -- the arithmetic ---------------------------------------------------------------------


def test_largest_output_is_the_issue_example() -> None:
    # 15,960 units left, 5 input tokens, output 4x: 3,988 output tokens (15,957 units).
    lim = _limit(20_000, Weights(1, 0.25, 4))
    assert largest_output(lim, TokenUsage(5, 0, 4096), 15_960) == 3988


@pytest.mark.parametrize("w_in", [0.3, 1.0, 1.7, 2.5])
@pytest.mark.parametrize("w_out", [0.1, 0.3, 1.0, 3.3, 4.0, 7.25])
@pytest.mark.parametrize("remaining", [0, 7, 100, 15_960, 999_983])
def test_largest_output_is_exactly_the_most_that_fits(
    w_in: float, w_out: float, remaining: int
) -> None:
    lim = _limit(10**7, Weights(w_in, 0.5, w_out), per_request=1)
    tokens = TokenUsage(13, 3, 10**6)
    out = largest_output(lim, tokens, remaining)
    if lim.units(TokenUsage(13, 3, 0)) > remaining:
        assert out is None
        return
    assert out is not None
    assert lim.units(TokenUsage(13, 3, out)) <= remaining  # the ledger's own rounding
    assert lim.units(TokenUsage(13, 3, out + 1)) > remaining


def test_output_that_costs_nothing_cannot_be_capped() -> None:
    assert largest_output(_limit(100, Weights(1, 1, 0)), TokenUsage(5, 0, 9), 50) is None


# -- the enforcer's decision ---------------------------------------------------------------


def _policy(tmp_path: Path, user_budget: str = "", extra: str = "") -> Path:
    key = hashlib.sha256(b"k-alice").hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {key}, claims: {{org_id: acme, sub: alice}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
weights: {{input: 1, cached_input: 0.25, output: 4}}
budgets:
  - {{name: org-day, match: {{org: acme}}, tokens: 10000000, period: day}}
  - {{name: user-daily, match: {{user: "*"}}, tokens: 20000, period: day{user_budget}}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 4096}}]
{extra}
""")
    return path


def _check(body: dict[str, object], path: str = "/v1/chat/completions") -> CheckInput:
    return CheckInput("POST", path, {"authorization": "Bearer k-alice"}, json.dumps(body).encode())


HI = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}  # input estimate 5


async def _spent(tmp_path: Path, user_budget: str = "", extra: str = "") -> Enforcer:
    """The issue's user: 4,040 of 20,000 units spent, 15,960 left."""
    clock = FakeClock()
    enf = Enforcer(PolicyStore(_policy(tmp_path, user_budget, extra)), MemoryLedger(clock), clock)
    d = await enf.check(_check({**HI, "max_tokens": 1000}))
    assert d.reservation_id and d.output_cap is None
    await enf.settle(d.reservation_id, TokenUsage(40, 0, 1000))
    return enf


async def test_the_locked_out_user_is_admitted_with_a_cap(tmp_path: Path) -> None:
    enf = await _spent(tmp_path)
    d = await enf.check(_check(HI))  # no max_tokens: worst case 5 + 4096 x 4 = 16,389
    assert d.allowed and d.output_cap == 3988 and d.output_reserved == 3988
    assert d.quota is not None and d.quota.remaining == 15_960 - 5 - 3988 * 4
    resp = check_response(d, _check(HI), KEYS)
    added = {h.header.key: h.header.value for h in resp.ok_response.response_headers_to_add}
    assert added["x-authz-max-tokens"] == "3988"
    assert metadata_fields(d, KEYS)["output_cap"] == 3988


async def test_over_reserve_deny_keeps_the_429(tmp_path: Path) -> None:
    enf = await _spent(tmp_path, ", over_reserve: deny")
    d = await enf.check(_check(HI))
    assert not d.allowed and d.status == 429 and d.reason is DenyReason.BUDGET_EXHAUSTED
    assert "16389" in d.message.replace(",", "")


async def test_below_min_output_tokens_is_refused_with_the_worst_case(tmp_path: Path) -> None:
    enf = await _spent(tmp_path, ", min_output_tokens: 4000")
    d = await enf.check(_check(HI))
    assert not d.allowed and d.status == 429 and "16389" in d.message.replace(",", "")


async def test_a_smaller_request_that_fits_is_not_capped(tmp_path: Path) -> None:
    enf = await _spent(tmp_path)
    d = await enf.check(_check({**HI, "max_tokens": 3000}))
    assert d.allowed and d.output_cap is None and d.output_reserved == 3000


async def test_n_choices_are_capped_each(tmp_path: Path) -> None:
    enf = await _spent(tmp_path)
    d = await enf.check(_check({**HI, "max_tokens": 4000, "n": 2}))
    assert d.allowed and d.output_cap == 1994 and d.output_reserved == 3988


async def test_a_binding_deny_budget_wins_over_a_cap(tmp_path: Path) -> None:
    # The org budget (deny) binds too: capped for the user, still refused by the org.
    extra = """
  - {name: org-tight, match: {org: acme}, tokens: 12000, period: week, over_reserve: deny}
""".strip()
    text = _policy(tmp_path).read_text().replace("models:", f"  {extra}\nmodels:")
    (tmp_path / "policy.yaml").write_text(text)
    clock = FakeClock()
    enf = Enforcer(PolicyStore(tmp_path / "policy.yaml"), MemoryLedger(clock), clock)
    d = await enf.check(_check(HI))
    assert not d.allowed and "org-tight" in d.message


async def test_rates_do_not_cap(tmp_path: Path) -> None:
    enf = await _spent(
        tmp_path, extra="rates: [{name: tpm, match: {user: '*'}, tokens_per_minute: 3000}]"
    )
    d = await enf.check(_check(HI))
    assert not d.allowed and d.reason is DenyReason.RATE_LIMITED and d.output_cap is None


# -- the policy keys ---------------------------------------------------------------------


def _doc(budget_extra: dict[str, object]) -> dict[str, object]:
    return {
        "version": 1,
        "identity": {"api_keys": [{"name": "a", "sha256": "0" * 64, "claims": {"org_id": "x"}}]},
        "subject": {"org": {"claim": "org_id"}},
        "budgets": [
            {"name": "b", "match": {"org": "*"}, "tokens": 10, "period": "day", **budget_extra}
        ],
    }


def test_cap_keys_default_and_parse() -> None:
    b = parse_policy(_doc({}), "p.yaml").budgets[0]
    assert (b.over_reserve, b.min_output_tokens) == ("cap", 256)
    b = parse_policy(_doc({"over_reserve": "deny", "min_output_tokens": 1}), "p.yaml").budgets[0]
    assert (b.over_reserve, b.min_output_tokens) == ("deny", 1)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            {"over_reserve": "maybe"},
            "budgets[0].over_reserve: must be one of cap, deny (got 'maybe')",
        ),
        ({"over_reserve": False}, "budgets[0].over_reserve: must be one of cap, deny (got False)"),
        ({"min_output_tokens": 0}, "budgets[0].min_output_tokens: must be an integer >= 1 (got 0)"),
        (
            {"min_output_tokens": True},
            "budgets[0].min_output_tokens: must be an integer >= 1 (got True)",
        ),
        (
            {"min_output_tokens": "256"},
            "budgets[0].min_output_tokens: must be an integer >= 1 (got '256')",
        ),
        (
            {"min_output_tokens": 2.5},
            "budgets[0].min_output_tokens: must be an integer >= 1 (got 2.5)",
        ),
    ],
)
def test_cap_keys_errors_name_file_path_and_value(extra: dict[str, object], error: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(_doc(extra), "p.yaml")
    assert str(err.value) == f"p.yaml:{error}"


def test_example_policy_documents_the_keys() -> None:
    text = (Path(__file__).parents[2] / "examples" / "policy.yaml").read_text()
    assert "over_reserve" in text and "min_output_tokens" in text
    assert isinstance(yaml.safe_load(text), dict)


# -- the body rewrite ---------------------------------------------------------------------


def _rewrite(
    api: Api, body: dict[str, object], cap: int, usage: bool = False
) -> tuple[dict[str, object], RequestChanges]:
    changes = RequestChanges()
    out = rewrite_request(json.dumps(body).encode(), api, changes, add_usage=usage, cap=cap)
    assert out is not None
    return json.loads(out), changes


@pytest.mark.parametrize(
    ("api", "body", "fields"),
    [
        (Api.OPENAI_CHAT, {}, ("max_completion_tokens",)),  # none named: the current field
        (Api.OPENAI_CHAT, {"max_tokens": 4096}, ("max_tokens",)),
        (Api.OPENAI_CHAT, {"max_completion_tokens": 9000}, ("max_completion_tokens",)),
        (
            Api.OPENAI_CHAT,
            {"max_tokens": 9000, "max_completion_tokens": 9000},
            ("max_tokens", "max_completion_tokens"),
        ),
        (Api.OPENAI_COMPLETIONS, {}, ("max_tokens",)),
        (Api.OPENAI_RESPONSES, {}, ("max_output_tokens",)),
        (Api.OPENAI_RESPONSES, {"max_output_tokens": 5000}, ("max_output_tokens",)),
        (Api.ANTHROPIC_MESSAGES, {"max_tokens": 4096}, ("max_tokens",)),
    ],
)
def test_cap_is_written_in_the_apis_field(
    api: Api, body: dict[str, object], fields: tuple[str, ...]
) -> None:
    out, changes = _rewrite(api, {"model": "m", **body}, 300)
    assert changes.output_cap == 300 and changes.capped_fields == fields
    assert all(out[f] == 300 for f in fields)
    assert next(iter(out)) == "model"  # keys keep their order


def test_cap_and_include_usage_in_one_rewrite() -> None:
    out, changes = _rewrite(Api.OPENAI_CHAT, {"model": "m", "stream": True}, 300, usage=True)
    assert out["stream_options"] == {"include_usage": True} and out["max_completion_tokens"] == 300
    assert changes.added_include_usage and changes.capped_fields == ("max_completion_tokens",)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"{" + b" " * (1024 * 1024) + b"}"])
def test_a_cap_that_cannot_be_written_raises(raw: bytes) -> None:
    with pytest.raises(CapUnwritable):
        rewrite_request(raw, Api.OPENAI_CHAT, RequestChanges(), add_usage=True, cap=300)
    assert rewrite_request(raw, Api.OPENAI_CHAT, RequestChanges(), add_usage=True, cap=None) is None


# -- the signed handle ---------------------------------------------------------------------


def test_the_cap_is_signed() -> None:
    h = Handle("r@acme", "org:acme", "acme", "openai.chat", "gpt-4o", 5, 300, False, 300)
    mac = KEYS.sign(h)
    assert KEYS.verify(h, mac) is None
    assert KEYS.verify(h._replace(output_cap=0), mac) is SettleRefusal.FORGED  # dropped
    assert KEYS.verify(h._replace(output_cap=4096), mac) is SettleRefusal.FORGED  # raised
    uncapped = h._replace(output_cap=0)
    assert KEYS.verify(h, KEYS.sign(uncapped)) is SettleRefusal.FORGED  # added


# -- ext_proc: a cap that cannot be written is a 429, never an uncapped request --------


async def test_extproc_refuses_and_releases_when_the_cap_cannot_be_written(
    tmp_path: Path,
) -> None:
    enf = await _spent(tmp_path)
    inp = _check(HI)
    d = await enf.check(inp)
    assert d.reservation_id and d.output_cap == 3988
    meta = struct_pb2.Struct()
    meta.update(metadata_fields(d, KEYS))
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"\xff not json", end_of_stream=True))
    req.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(meta)
    servicer = ExternalProcessorServicer(enf, Metrics(), handles=KEYS)

    async def stream():  # type: ignore[no-untyped-def]
        yield req

    out = [r async for r in servicer.Process(stream(), None)]  # type: ignore[arg-type]
    await servicer.drain()
    immediate = out[0].immediate_response
    assert out[0].WhichOneof("response") == "immediate_response" and immediate.status.code == 429
    assert json.loads(immediate.body)["error"]["code"] == "insufficient_quota"
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert headers["x-authz-max-tokens"] == "3988" and headers["x-should-retry"] == "false"
    # Released: the next request sees the whole 15,960 again (capped at 3,988 once more).
    again = await enf.check(inp)
    assert again.output_cap == 3988 and again.quota is not None
    assert again.quota.remaining == 15_960 - 5 - 3988 * 4


async def test_an_expired_capped_reservation_is_charged_the_cap_not_the_worst_case(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    policy = _policy(tmp_path, extra="reservations: {ttl_s: 60, on_expiry: reserved}")
    ledger = MemoryLedger(clock)
    enf = Enforcer(PolicyStore(policy), ledger, clock)
    first = await enf.check(_check({**HI, "max_tokens": 1000}))
    assert first.reservation_id
    await enf.settle(first.reservation_id, TokenUsage(40, 0, 1000))
    d = await enf.check(_check(HI))
    assert d.output_cap == 3988
    clock.advance(61)
    assert await enf.expire_overdue() == 1
    after = await enf.check(_check({**HI, "max_tokens": 0}))
    # Charged the capped 5 + 3,988 x 4 = 15,957 (the worst case, 16,389, would overshoot).
    assert after.quota is not None and after.quota.remaining == 20_000 - 4040 - 15_957


def test_a_misspelt_cap_key_is_an_error_that_lists_the_real_ones() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(_doc({"over_reserv": "cap"}), "p.yaml")
    assert str(err.value).startswith("p.yaml:budgets[0].over_reserv: unknown key; allowed: ")
    assert "min_output_tokens" in str(err.value) and "over_reserve" in str(err.value)
