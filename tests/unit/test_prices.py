"""Prices as providers bill (issue 16): tiers, cache writes and reads, service tiers.

Known answers worked by hand, at the rates of the policy below (per million tokens,
so a budget in USD counts micro-dollars: one token at $3/M costs 3 units).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from authz.apis import Api
from authz.clock import FakeClock
from authz.enforcer import CheckInput, Enforcer
from authz.errors import PolicyError
from authz.ledger import MemoryLedger
from authz.policy.admission import Price
from authz.policy.loader import load_policy
from authz.policy.prices import bill, rates_for
from authz.policy.store import PolicyStore
from authz.price_settle import price_difference, settle_price
from authz.usage import parse_json_usage
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

HEAD = """
version: 1
timezone: UTC
identity:
  api_keys: [{{name: a, sha256: {}, claims: {{org_id: acme, sub: ann}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
models:
  rules: [{{match: "*", max_output_tokens: 100}}]
""".format(hashlib.sha256(b"ka").hexdigest())
PRICES = """
budgets:
  - {name: spend, match: {org: acme}, cost: 1000, period: month}
  - {name: tokens, match: {user: '*'}, tokens: 1000000, period: month}
prices:
  models:
    - match: "claude-*"
      input: 3
      cached_input: 0.3
      cache_write: 3.75
      output: 15
      tiers:
        - {above_input_tokens: 200000, input: 6, cached_input: 0.6, cache_write: 7.5, output: 22.5}
      service_tiers: {priority: 2, batch: 0.5}
    - {match: "gpt-*", input: 2, cached_input: 0.5, output: 8}
"""


def policy_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + body)
    return path


@pytest.fixture
def claude(tmp_path: Path) -> Price:
    price = load_policy(policy_file(tmp_path, PRICES)).pricing.for_model("claude-x")
    assert price is not None
    return price


def test_cache_writes_and_reads_priced_apart(claude: Price) -> None:
    # 1000 input of which 400 written to the cache, 2000 read from it, 100 output:
    # 600*3 + 400*3.75 + 2000*0.3 + 100*15 = 1800 + 1500 + 600 + 1500
    usage = TokenUsage(1000, 2000, 100, cache_write_tokens=400)
    assert bill(claude, usage) == 5400
    # The ledger's base weights counted the writes as input: 1000*3 + 600 + 1500
    assert claude.weights().units(usage) == 5100


def test_above_the_context_tier_the_whole_call_is_billed_at_its_rates(claude: Price) -> None:
    at = TokenUsage(150_000, 50_000, 1000)  # 200000 in: not above
    assert bill(claude, at) == 150_000 * 3 + 50_000 * 0.3 + 1000 * 15
    above = TokenUsage(150_000, 50_001, 1000)
    assert bill(claude, above) == 150_000 * 6 + round(50_001 * 0.6) + 1000 * 22.5
    assert rates_for(claude, 200_001).input == 6


def test_service_tier_factor_on_every_rate(claude: Price) -> None:
    usage = TokenUsage(100, 0, 10, service_tier="priority")
    assert bill(claude, usage) == 2 * (100 * 3 + 10 * 15)
    assert bill(claude, TokenUsage(100, 0, 10, service_tier="batch")) == 225
    assert bill(claude, TokenUsage(100, 0, 10, service_tier="standard")) == 450  # 1x


def test_price_difference_only_ever_more(tmp_path: Path) -> None:
    policy = load_policy(policy_file(tmp_path, PRICES))
    priority = TokenUsage(100, 0, 10, service_tier="priority")
    assert price_difference(policy, "claude-x", priority) == 450
    assert price_difference(policy, "claude-x", TokenUsage(100, 0, 10, service_tier="batch")) == 0
    assert price_difference(policy, "gpt-4o", TokenUsage(100, 0, 10, service_tier="priority")) == 0


def test_parsers_report_cache_writes_and_service_tier() -> None:
    anthropic = {"usage": {"input_tokens": 10, "cache_creation_input_tokens": 400,
                           "cache_read_input_tokens": 2000, "output_tokens": 5,
                           "service_tier": "priority"}}  # fmt: skip
    u = parse_json_usage(Api.ANTHROPIC_MESSAGES, json.dumps(anthropic).encode())
    assert u is not None
    assert (u.input_tokens, u.cache_write_tokens, u.cached_input_tokens) == (410, 400, 2000)
    assert u.service_tier == "priority"
    openai = {"service_tier": "flex", "usage": {"prompt_tokens": 1000, "completion_tokens": 5,
              "prompt_tokens_details": {"cached_tokens": 800}}}  # fmt: skip
    u = parse_json_usage(Api.OPENAI_CHAT, json.dumps(openai).encode())
    assert u is not None and (u.input_tokens, u.cached_input_tokens) == (200, 800)
    assert u.service_tier == "flex"


async def test_settlement_charges_the_cost_budget_as_billed(tmp_path: Path) -> None:
    clock = FakeClock(1_772_000_000.0)
    ledger = MemoryLedger(clock)
    enf = Enforcer(PolicyStore(policy_file(tmp_path, PRICES)), ledger, clock)
    body = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    d = await enf.check(CheckInput("POST", "/v1/messages", {"x-api-key": "ka"},
                                   json.dumps(body).encode()))  # fmt: skip
    assert d.allowed and d.reservation_id
    usage = TokenUsage(10, 0, 10, cache_write_tokens=0, service_tier="priority")
    assert await enf.settle(d.reservation_id, usage)
    assert await enf.settle_price(d.reservation_id, str(d.subject), "claude-x", usage) == 180
    # Once: the charge id is the reservation's.
    await enf.settle_price(d.reservation_id, str(d.subject), "claude-x", usage)
    policy = enf.policy
    limits = {lim.budget: lim for lim in enf.limits_for(policy, d.subject, "claude-x")}
    spend = await ledger.balance(limits["spend"])
    assert spend.used == 2 * (10 * 3 + 10 * 15)  # 360: base 180 + the priority difference
    tokens = await ledger.balance(limits["tokens"])
    assert tokens.used == 20  # token budgets count tokens, whatever the price


BAD = {
    "{match: 'x', input: 1, output: 1, tiers: [{above_input_tokens: 0, input: 1, output: 1}]}":
        "prices.models[0].tiers[0].above_input_tokens: must be an integer >= 1 (got 0)",
    "{match: 'x', input: 1, output: 1, tiers: [{above_input_tokens: 9, input: 1, output: 1},"
    " {above_input_tokens: 9, input: 2, output: 2}]}":
        "prices.models[0].tiers[1].above_input_tokens: must be above the tier before it (got 9)",
    "{match: 'x', input: 1, output: 1, service_tiers: {priority: 0}}":
        "prices.models[0].service_tiers.priority: must be above 0 (never free) (got 0)",
    "{match: 'x', input: 1, output: 1, cache_write: -1}":
        "prices.models[0].cache_write: must be a number >= 0.0 (got -1)",
    "{match: 'x', input: 1, output: 1, tiers: [{above_input_tokens: 9, input: 1, outptu: 1}]}":
        "prices.models[0].tiers[0].outptu: unknown key; allowed: above_input_tokens, "
        "cache_write, cached_input, input, output",
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(BAD))
def test_bad_prices_name_file_path_and_value(tmp_path: Path, model: str) -> None:
    file = policy_file(tmp_path, f"budgets: []\nprices: {{models: [{model}]}}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(file)
    assert str(err.value) == f"{file}:{BAD[model]}"


async def test_a_failed_difference_charge_never_fails_the_settlement(tmp_path: Path) -> None:
    class Broken:
        async def charge(self, *args: object) -> bool:
            raise ConnectionError("store down")

    policy = load_policy(policy_file(tmp_path, PRICES))
    clock = FakeClock(1_772_000_000.0)
    enf = Enforcer(PolicyStore(policy_file(tmp_path, PRICES)), MemoryLedger(clock), clock)
    usage = TokenUsage(10, 0, 10, service_tier="priority")
    got = await settle_price(policy, Broken(), enf.limits_for, "r1", "org:acme/user:ann",
                             "claude-x", usage)  # fmt: skip
    assert got == 0
