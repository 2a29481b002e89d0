"""Validation of each budget's over-reservation choice: ``over_reserve`` and
``min_output_tokens`` (issue 10, #2).

A request names the most output it may produce (or the policy's per-model default
when it names none); the reservation covers that worst case. When it does not fit,
``over_reserve: cap`` (the default) admits the request with its output limit lowered
to what is left, provided at least ``min_output_tokens`` are left; ``deny`` refuses it
as before. Kept apart from :mod:`authz.policy.loader` (already long): the loader hands
each budget's raw mapping here (its key check lists these keys as allowed, for
the hint in an unknown-key error; they never reach it).
Errors read like the loader's: ``file:budgets[i].min_output_tokens: must be an
integer >= 1 (got 0)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar, cast

from authz.policy.loader_admission import Reader
from authz.policy.model import Budget, Weights

__all__ = ["CAP_KEYS", "DEFAULT_MIN_OUTPUT_TOKENS", "OVER_RESERVE", "with_caps"]

CAP_KEYS = ("over_reserve", "min_output_tokens")
OVER_RESERVE = ("cap", "deny")
# Below this an answer is rarely useful: a refusal the client can read beats a reply cut
# after a sentence. Policies with short answers (classification) may lower it.
DEFAULT_MIN_OUTPUT_TOKENS = 256
R = TypeVar("R", bound=Reader)
Parse = Callable[[R, Any, str, Weights], Budget]


def with_caps(r: R, raw: Any, p: str, weights: Weights, parse: Parse[R]) -> Budget:
    """``parse`` (the loader's budget reader) on ``raw`` without the cap keys, then the
    cap keys validated and set on the budget it returns."""
    if not isinstance(raw, dict):
        return parse(r, raw, p, weights)  # the loader names the error ("must be a mapping")
    budget = parse(r, {k: v for k, v in raw.items() if k not in CAP_KEYS}, p, weights)
    over = r.choice(raw.get("over_reserve", "cap"), f"{p}.over_reserve", OVER_RESERVE)
    least = r.integer(
        raw.get("min_output_tokens", DEFAULT_MIN_OUTPUT_TOKENS), f"{p}.min_output_tokens", 1
    )
    return replace(budget, over_reserve=cast(Any, over), min_output_tokens=least)
