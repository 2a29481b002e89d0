"""Admission-control policy values: rates, prices, the wait queue and peak hours.

Budgets say how much a subject may spend in a period; these say how fast, at what
price, who waits first when a rate is reached, and what yields during peak hours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, time
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

if TYPE_CHECKING:  # model imports this module: no runtime import back
    from authz.policy.model import SubjectPath, Weights
    from authz.policy.prices import PriceTier

__all__ = ["Price", "Pricing", "QueuePolicy", "Rate", "Schedule", "matches"]

RateKind = Literal["tokens_per_minute", "requests_per_minute", "concurrent"]
RATE_KINDS: tuple[str, ...] = ("tokens_per_minute", "requests_per_minute", "concurrent")
Match = tuple[tuple[str, str], ...]


def matches(match: Match, path: SubjectPath) -> bool:
    """Every named level is on the path with that name (``*``: any name)."""
    for level, want in match:
        have = path.get(level)
        if have is None or (want != "*" and want != have):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Rate:
    name: str
    match: Match
    level: str
    kind: RateKind
    amount: int
    specificity: int


@dataclass(frozen=True, slots=True)
class Price:
    """Currency per million tokens of each kind."""

    pattern: str
    input: float
    cached_input: float
    output: float
    # As providers bill (authz.policy.prices): None = the input rate.
    cache_write: float | None = None
    tiers: tuple[PriceTier, ...] = ()  # ascending above_input_tokens
    service_tiers: tuple[tuple[str, float], ...] = ()  # (tier name, factor)

    @property
    def cache_write_rate(self) -> float:
        return self.input if self.cache_write is None else self.cache_write

    @property
    def billed_apart(self) -> bool:
        """Whether a settlement may cost other than the three base weights say."""
        return bool(self.tiers or self.service_tiers) or self.cache_write_rate != self.input

    def weights(self) -> Weights:
        # A budget in currency counts micro-units: one token of a model priced at
        # P per million costs exactly P micro-units.
        from authz.policy.model import Weights

        return Weights(self.input, self.cached_input, self.output)


@functools.lru_cache(maxsize=4096)  # bounded: clients choose model strings
def _first_price(prices: tuple[Price, ...], model: str) -> Price | None:
    for price in prices:
        if fnmatchcase(model, price.pattern):
            return price
    return None


@dataclass(frozen=True, slots=True)
class Pricing:
    currency: str = "USD"
    prices: tuple[Price, ...] = ()
    unpriced: Price | None = None  # None: a model without a price is denied

    def for_model(self, model: str | None) -> Price | None:
        if model is not None:
            found = _first_price(self.prices, model)
            if found is not None:
                return found
        return self.unpriced


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """A check held back only by a rate waits up to ``max_wait_s`` (0: deny at once)."""

    max_wait_s: float = 0.0
    max_depth: int = 1000
    priority_claim: str | None = None
    default_priority: int = 0
    priority_rules: tuple[tuple[Match, int], ...] = ()

    def priority(self, path: SubjectPath, claims: Any) -> int:
        if self.priority_claim is not None:
            value = claims.get(self.priority_claim) if hasattr(claims, "get") else None
            if isinstance(value, int | str) and not isinstance(value, bool):
                try:
                    return int(value)
                except ValueError:
                    pass
        for match, prio in self.priority_rules:
            if matches(match, path):
                return prio
        return self.default_priority


@dataclass(frozen=True, slots=True)
class Schedule:
    """Peak hours (local time, policy timezone) when non-critical work yields."""

    days: frozenset[int]  # 0 = Monday
    start: time
    end: time
    non_critical: tuple[Match, ...]
    during_peak: Literal["defer", "queue"] = "defer"

    def is_non_critical(self, path: SubjectPath) -> bool:
        return any(matches(m, path) for m in self.non_critical)

    def peak_ends_at(self, now: float, tz: ZoneInfo) -> float | None:
        """When the current peak ends (epoch seconds), or None if ``now`` is off-peak."""
        local = datetime.fromtimestamp(now, tz)
        if local.weekday() not in self.days:
            return None
        start = local.replace(
            hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0
        )
        end = local.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if start <= local < end:
            return end.timestamp()
        return None
