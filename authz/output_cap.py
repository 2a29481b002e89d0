"""Admit what fits: a request whose worst case does not fit gets its output lowered.

A request reserves its input estimate plus the most output it may produce: its
``max_tokens`` (or the like), or the policy's per-model default when it names none, as
most SDK calls do. With output weighted 4x and 4,096 tokens by default, a user with
16,000 of 20,000 units left was refused for the rest of the day (issue 10, #2). When
every budget that refuses says ``over_reserve: cap`` (the default), the request is
admitted instead with its output limit lowered to the largest that fits, if that is at
least the budget's ``min_output_tokens``; ext_proc then writes that limit into the body
(:mod:`authz.mutate.request`), so the model stops there (``finish_reason: length``).

It works above the ledger API, the same on every backend: each step is a normal
all-or-nothing :meth:`Ledger.reserve`. A refusal names the first limit that cannot take
the request and what is left on it; the output is lowered to fit that limit and the
reserve is tried again, at most once per limit on the path. A concurrent request that
took the room in between makes the next reserve refuse again (lower, or deny): the
ledger never holds more than a limit allows, so a hard budget is never exceeded.

Only period budgets cap. A rate (requests or tokens per minute, concurrency) refuses
for a moment, not for the period: its refusal keeps today's answer (wait in the queue,
or a retryable 429) instead of a shorter reply. A soft budget caps at its hard end
(amount plus grace plus burst, the limit's ``amount``): the soft zone stays usable, with
its warning.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from authz.admission import PlannedLimit
from authz.ledger.base import Limit, Refusal, Reservation
from authz.usage.types import TokenUsage

__all__ = ["CapRule", "Capped", "cap_rules", "largest_output", "reserve_capped"]

Reserve = Callable[[TokenUsage], Awaitable[Reservation | Refusal]]


@dataclass(frozen=True, slots=True)
class CapRule:
    """One budget's choice, keyed by its limit's key (authz.admission.PlannedLimit)."""

    cap: bool  # over_reserve: cap (True) or deny
    min_output_tokens: int


@dataclass(frozen=True, slots=True)
class Capped:
    """What :func:`reserve_capped` ended with."""

    outcome: Reservation | Refusal
    tokens: TokenUsage  # what was last asked for (the capped amount, if it was capped)
    cap: int | None  # the per-choice output limit to write into the body; None: uncapped


def cap_rules(plan: Iterable[PlannedLimit]) -> dict[str, CapRule]:
    """Each period budget's choice by its limit's key; rates have none (never cap)."""
    return {
        p.limit.key: CapRule(p.budget.over_reserve == "cap", p.budget.min_output_tokens)
        for p in plan
        if p.budget is not None and not p.rate
    }


def largest_output(limit: Limit, tokens: TokenUsage, remaining: int) -> int | None:
    """The most output tokens that, with ``tokens``' input, cost ``limit`` at most
    ``remaining`` units; None if output costs nothing there (capping cannot help) or
    not even zero output fits."""
    w = limit.weights.output
    if w <= 0:
        return None
    base = replace(tokens, output_tokens=0)
    if limit.units(base) > remaining:
        return None
    # Solve in floats, then settle on the exact integer by the ledger's own rounding
    # (units() rounds up): a step or two either way at most.
    room = remaining - limit.per_request - limit.weights.units(base)
    out = max(0, math.floor(room / w))
    while out > 0 and limit.units(replace(tokens, output_tokens=out)) > remaining:
        out -= 1
    while limit.units(replace(tokens, output_tokens=out + 1)) <= remaining:
        out += 1
    return out


async def reserve_capped(
    reserve: Reserve,
    tokens: TokenUsage,
    refusal: Refusal,
    rules: Mapping[str, CapRule],
    choices: int = 1,
) -> Capped:
    """After ``refusal`` of ``tokens``, reserve the largest output that fits, or refuse.

    ``reserve`` is one all-or-nothing ledger reserve of the given tokens. ``rules`` has
    the period budgets on the path (a limit not in it, a rate, never caps). ``choices``
    (OpenAI ``n``) each get the per-choice cap, so the reserved output is a multiple of
    it. A refusal that is not capped is returned as the worst case's refusal, with the
    worst case's units, so the 429 says what the request needed.
    """
    want, least, cap = tokens, 0, None
    for _ in range(len(rules) + 1):
        rule = rules.get(refusal.limit.key)
        if rule is None:  # a rate: wait or retry (with the cap found so far), as before
            return Capped(refusal, want, cap)
        fit = None
        if rule.cap and refusal.retry_after_s is None:
            fit = largest_output(refusal.limit, tokens, refusal.remaining)
            least = max(least, rule.min_output_tokens)
        per_choice = -1 if fit is None else fit // max(1, choices)
        if per_choice < least or per_choice * choices >= want.output_tokens:
            worst = replace(refusal, requested=refusal.limit.units(tokens))
            return Capped(worst, tokens, None)
        want, cap = replace(tokens, output_tokens=per_choice * choices), per_choice
        out = await reserve(want)
        if isinstance(out, Reservation):
            return Capped(out, want, cap)
        refusal = out
    return Capped(replace(refusal, requested=refusal.limit.units(tokens)), tokens, None)
