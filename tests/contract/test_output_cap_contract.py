"""Admit what fits (issue 10, #2) on every ledger backend: the capped reserve is a
normal all-or-nothing reserve, so each backend holds exactly the capped amount and no
limit ever goes past its amount."""

from __future__ import annotations

from authz.clock import FakeClock
from authz.ledger import Ledger, Limit, Refusal, Reservation
from authz.output_cap import CapRule, reserve_capped
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.contract.backends import lim, tok

W4 = Weights(1, 0.25, 4)  # the example policy's weights: output counts 4x
CAP = CapRule(cap=True, min_output_tokens=256)
DENY = CapRule(cap=False, min_output_tokens=256)


async def _spend(ledger: Ledger, clock: FakeClock, limits: tuple[Limit, ...], n: int) -> None:
    """Use ``n`` input tokens (x1) on ``limits``: reserved, then settled."""
    rid = f"spent{n}"
    out = await ledger.reserve(rid, limits, tok(n), deadline=clock.now() + 60,
                               expiry_charge=tok(0))  # fmt: skip
    assert isinstance(out, Reservation)
    await ledger.settle(rid, tok(n))


async def _capped(
    ledger: Ledger, clock: FakeClock, limits: tuple[Limit, ...], rules: dict[str, CapRule],
    tokens: TokenUsage, rid: str = "r1", choices: int = 1,
):  # type: ignore[no-untyped-def]  # fmt: skip
    async def reserve(amount: TokenUsage) -> Reservation | Refusal:
        return await ledger.reserve(rid, limits, amount, deadline=clock.now() + 60,
                                    expiry_charge=tok(amount.input_tokens))  # fmt: skip

    first = await reserve(tokens)
    assert isinstance(first, Refusal), "the worst case must not fit for these tests"
    return await reserve_capped(reserve, tokens, first, rules, choices)


async def test_the_issue_example_is_capped_to_what_is_left(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    org, user = lim("org|a", 10_000_000, clock, W4), lim("user|a/u", 20_000, clock, W4)
    await _spend(ledger, clock, (org, user), 4040)  # 15,960 left
    rules = {org.key: CAP, user.key: CAP}
    got = await _capped(ledger, clock, (org, user), rules, TokenUsage(5, 0, 4096))
    assert isinstance(got.outcome, Reservation) and got.cap == 3988
    assert got.tokens == TokenUsage(5, 0, 3988)
    assert got.outcome.units == (5 + 3988 * 4, 5 + 3988 * 4)
    assert (await ledger.balance(user)).remaining == 15_960 - 15_957
    assert (await ledger.balance(org)).reserved == 15_957
    # The model stopped at the cap: settle what it reported; the budget is not exceeded.
    await ledger.settle("r1", TokenUsage(5, 0, 3988))
    bal = await ledger.balance(user)
    assert (bal.used, bal.reserved) == (4040 + 15_957, 0) and bal.used <= user.amount


async def test_the_tightest_of_several_binding_budgets_caps(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    team, user = lim("team|a/t", 9_000, clock, W4), lim("user|a/t/u", 12_000, clock, W4)
    await _spend(ledger, clock, (team, user), 1_000)  # team 8,000 left; user 11,000
    rules = {team.key: CAP, user.key: CAP}
    got = await _capped(ledger, clock, (user, team), rules, TokenUsage(100, 0, 4096))
    assert isinstance(got.outcome, Reservation) and got.cap == (8_000 - 100) // 4
    assert (await ledger.balance(team)).remaining == 0


async def test_a_binding_deny_budget_refuses_with_the_worst_case(
    env: tuple[Ledger, FakeClock],
) -> None:
    ledger, clock = env
    org, user = lim("org|a", 10_000, clock, W4), lim("user|a/u", 20_000, clock, W4)
    await _spend(ledger, clock, (org, user), 4040)
    got = await _capped(ledger, clock, (org, user), {org.key: DENY, user.key: CAP},
                        TokenUsage(5, 0, 4096))  # fmt: skip
    assert isinstance(got.outcome, Refusal) and got.cap is None
    assert got.outcome.limit.key == org.key and got.outcome.requested == 5 + 4096 * 4
    assert (await ledger.balance(user)).reserved == 0  # nothing held anywhere


async def test_less_than_min_output_left_is_refused(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    user = lim("user|a/u", 20_000, clock, W4)
    await _spend(ledger, clock, (user,), 19_000)  # 1,000 left: 248 output tokens at most
    got = await _capped(ledger, clock, (user,), {user.key: CAP}, TokenUsage(5, 0, 4096))
    assert isinstance(got.outcome, Refusal) and got.outcome.requested == 5 + 4096 * 4
    lower = CapRule(cap=True, min_output_tokens=100)
    got = await _capped(ledger, clock, (user,), {user.key: lower}, TokenUsage(5, 0, 4096))
    assert isinstance(got.outcome, Reservation) and got.cap == 248
    assert (await ledger.balance(user)).remaining == 1_000 - 5 - 248 * 4


async def test_a_refusing_rate_is_never_capped(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    budget = lim("user|a/u", 100_000, clock, W4)
    tpm = lim("tpm|a/u", 1_000, clock, Weights())  # a rate: not in the rules
    got = await _capped(ledger, clock, (budget, tpm), {budget.key: CAP}, TokenUsage(5, 0, 4096))
    assert isinstance(got.outcome, Refusal) and got.outcome.limit.key == tpm.key
    assert got.cap is None and (await ledger.balance(budget)).reserved == 0


async def test_choices_share_the_cap(env: tuple[Ledger, FakeClock]) -> None:
    ledger, clock = env
    user = lim("user|a/u", 20_000, clock, W4)
    await _spend(ledger, clock, (user,), 4040)
    got = await _capped(ledger, clock, (user,), {user.key: CAP}, TokenUsage(5, 0, 8192),
                        choices=2)  # fmt: skip
    assert isinstance(got.outcome, Reservation) and got.cap == 1994
    assert got.tokens.output_tokens == 3988
