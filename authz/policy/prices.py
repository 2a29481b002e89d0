"""Prices as providers bill: context tiers, cache writes and reads, service tiers.

A model's :class:`~authz.policy.admission.Price` has a base rate per million tokens of
each kind (input, cached input = cache reads, output) and, here, what providers add:

- ``cache_write``: the rate of input written to the prompt cache (Anthropic's
  ``cache_creation_input_tokens``: 1.25x input for the 5-minute cache). Default: input.
- ``tiers``: the rates once a call's input (all of it: plain, cache reads and writes)
  passes a threshold, e.g. Claude and Gemini above 200k tokens. The whole call is then
  billed at that tier's rates, as those providers do, not only the tokens past it.
- ``service_tiers``: a factor per tier the provider reports having served the call in
  (OpenAI ``service_tier``: ``priority``, ``flex``; Anthropic ``usage.service_tier``:
  ``priority``, ``batch``), applied to every rate. A tier not listed is billed at 1x.

:func:`bill` is the exact charge of a settled usage, in micro-units of the currency (a
budget in currency counts those). The ledger counts three kinds of tokens with one
weight each, fixed at Check (the base rates); :func:`bill` is what the settlement then
brings the cost budgets to (:mod:`authz.price_settle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from authz.usage.types import TokenUsage

if TYPE_CHECKING:
    from authz.policy.admission import Price

__all__ = ["PriceTier", "Rates", "bill", "rates_for"]


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Rates once a call's whole input is above ``above_input_tokens``."""

    above_input_tokens: int
    input: float
    cached_input: float
    cache_write: float
    output: float


@dataclass(frozen=True, slots=True)
class Rates:
    """Currency per million tokens of each kind, for one call."""

    input: float
    cached_input: float
    cache_write: float
    output: float


def rates_for(price: Price, total_input: int, service_tier: str = "") -> Rates:
    """The rates a call with ``total_input`` tokens of input, served in
    ``service_tier``, is billed at."""
    rates = Rates(price.input, price.cached_input, price.cache_write_rate, price.output)
    for tier in price.tiers:  # ascending thresholds: the last one passed wins
        if total_input > tier.above_input_tokens:
            rates = Rates(tier.input, tier.cached_input, tier.cache_write, tier.output)
    factor = dict(price.service_tiers).get(service_tier, 1.0)
    if factor != 1.0:
        rates = Rates(rates.input * factor, rates.cached_input * factor,
                      rates.cache_write * factor, rates.output * factor)  # fmt: skip
    return rates


def bill(price: Price, usage: TokenUsage) -> int:
    """What ``usage`` costs in micro-units, rounded up as the ledger rounds."""
    writes = min(usage.cache_write_tokens, usage.input_tokens)
    total_input = usage.input_tokens + usage.cached_input_tokens
    r = rates_for(price, total_input, usage.service_tier)
    raw = (
        (usage.input_tokens - writes) * r.input
        + writes * r.cache_write
        + usage.cached_input_tokens * r.cached_input
        + usage.output_tokens * r.output
    )
    return math.ceil(raw - 1e-9)
