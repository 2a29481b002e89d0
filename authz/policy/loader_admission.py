"""Validation of the admission-control sections: rates, prices, queue, schedule.

Same rules as :mod:`authz.policy.loader` (whose reader ``r`` is passed in): unknown keys
are errors, and every error names ``file:path`` and the bad value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import time
from typing import Any, NoReturn, Protocol, TypeVar, cast

from authz.policy.admission import RATE_KINDS, Match, Price, Pricing, QueuePolicy, Rate, Schedule
from authz.policy.names import escape_name
from authz.policy.prices import PriceTier

__all__ = [
    "amount_or_share",
    "parse_match",
    "parse_pricing",
    "parse_queue",
    "parse_rates",
    "parse_schedule",
]

LEVELS = ("org", "department", "team", "user", "app")


class Reader(Protocol):
    """The slice of ``authz.policy.loader._Reader`` used here."""

    def fail(self, path: str, message: str, value: Any = ...) -> NoReturn: ...
    def mapping(
        self, value: Any, path: str, allowed: set[str], required: set[str] = ...
    ) -> Any: ...
    def string(self, value: Any, path: str, pattern: str | None = None) -> str: ...
    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str: ...
    def integer(self, value: Any, path: str, minimum: int = 0) -> int: ...
    def number(self, value: Any, path: str, minimum: float = 0.0) -> float: ...
    def strings(self, value: Any, path: str) -> tuple[str, ...]: ...
    def items(self, value: Any, path: str, each: Callable[[Any, str], T]) -> tuple[T, ...]: ...


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SHARE = re.compile(r"^(\d+(?:\.\d+)?)%$")
T = TypeVar("T")


def parse_match(r: Reader, raw: Any, p: str) -> Match:
    match = r.mapping(raw, p, set(LEVELS))
    if not match:
        r.fail(p, "must name at least one level (e.g. {org: acme} or {user: '*'})")
    if "user" in match and "app" in match:
        r.fail(p, "cannot name both user and app: a path ends in one of them")
    for lv in match:
        if isinstance(match[lv], list | dict) or match[lv] is None:
            r.fail(f"{p}.{lv}", "must be a name or '*'", match[lv])
    # Names compare with escaped claim values (authz.policy.names): escape them alike.
    names = ((lv, r.string(str(match[lv]), f"{p}.{lv}")) for lv in LEVELS if lv in match)
    return tuple((lv, v if v == "*" else escape_name(v)) for lv, v in names)


def amount_or_share(r: Reader, raw: Any, p: str, of: int) -> int:
    """``"10%"`` of ``of``, or a whole number of units."""
    if isinstance(raw, str):
        m = _SHARE.match(raw.strip())
        if m is None or float(m.group(1)) > 1000:
            r.fail(p, "must be a percentage like '10%' or a whole number", raw)
        return int(of * float(m.group(1)) / 100)
    return r.integer(raw, p, 0)


def parse_rates(r: Reader, raw: Any) -> tuple[Rate, ...]:
    def rate(v: Any, p: str) -> Rate:
        m = r.mapping(v, p, {"name", "match", *RATE_KINDS}, {"name", "match"})
        kinds = [k for k in RATE_KINDS if k in m]
        if len(kinds) != 1:
            r.fail(p, f"needs exactly one of {', '.join(RATE_KINDS)}")
        pairs = parse_match(r, m["match"], f"{p}.match")
        return Rate(
            name=r.string(m["name"], f"{p}.name", r"[A-Za-z0-9_.:-]+"),
            match=pairs,
            level=pairs[-1][0],
            kind=cast(Any, kinds[0]),
            amount=r.integer(m[kinds[0]], f"{p}.{kinds[0]}", 1),
            specificity=sum(1 for _, v in pairs if v != "*"),
        )

    return cast(tuple[Rate, ...], r.items(raw, "rates", rate))


_PRICE_KEYS = {"input", "cached_input", "output", "cache_write", "tiers", "service_tiers"}


def _price(r: Reader, raw: Any, p: str, pattern: str) -> Price:
    allowed = _PRICE_KEYS | ({"match"} if pattern == "" else set())
    m = r.mapping(raw, p, allowed, {"input", "output"} | ({"match"} if pattern == "" else set()))
    inp = r.number(m["input"], f"{p}.input")
    cached = r.number(m.get("cached_input", inp), f"{p}.cached_input")
    write = r.number(m["cache_write"], f"{p}.cache_write") if "cache_write" in m else None
    return Price(
        pattern=pattern or r.string(m["match"], f"{p}.match"),
        input=inp,
        cached_input=cached,
        output=r.number(m["output"], f"{p}.output"),
        cache_write=write,
        tiers=_tiers(r, m.get("tiers"), f"{p}.tiers"),
        service_tiers=_service_tiers(r, m.get("service_tiers"), f"{p}.service_tiers"),
    )


def _tiers(r: Reader, raw: Any, p: str) -> tuple[PriceTier, ...]:
    """Context tiers, e.g. ``[{above_input_tokens: 200000, input: 6, output: 22.5}]``."""

    def tier(v: Any, q: str) -> PriceTier:
        keys = {"above_input_tokens", "input", "cached_input", "cache_write", "output"}
        m = r.mapping(v, q, keys, {"above_input_tokens", "input", "output"})
        inp = r.number(m["input"], f"{q}.input")
        return PriceTier(
            above_input_tokens=r.integer(m["above_input_tokens"], f"{q}.above_input_tokens", 1),
            input=inp,
            cached_input=r.number(m.get("cached_input", inp), f"{q}.cached_input"),
            cache_write=r.number(m.get("cache_write", inp), f"{q}.cache_write"),
            output=r.number(m["output"], f"{q}.output"),
        )

    tiers = r.items(raw, p, tier)
    for i in range(1, len(tiers)):
        if tiers[i].above_input_tokens <= tiers[i - 1].above_input_tokens:
            r.fail(f"{p}[{i}].above_input_tokens", "must be above the tier before it",
                   tiers[i].above_input_tokens)  # fmt: skip
    return tiers


def _service_tiers(r: Reader, raw: Any, p: str) -> tuple[tuple[str, float], ...]:
    """``{priority: 2.0, flex: 0.5}``: the factor on every rate per reported tier."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        r.fail(p, "must map a service tier name to a factor, e.g. {priority: 2.0}", raw)
    out = []
    for name, factor in raw.items():
        r.string(name, f"{p}", r"[a-z][a-z0-9_]*")
        f = r.number(factor, f"{p}.{name}")
        if f <= 0:
            r.fail(f"{p}.{name}", "must be above 0 (never free)", factor)
        out.append((name, float(f)))
    return tuple(out)


def parse_pricing(r: Reader, raw: Any) -> Pricing:
    m = r.mapping(raw, "prices", {"currency", "models", "unpriced"})
    prices = r.items(m.get("models"), "prices.models", lambda v, p: _price(r, v, p, ""))
    unpriced = m.get("unpriced", "deny")
    default = None
    if isinstance(unpriced, dict):
        default = _price(r, unpriced, "prices.unpriced", "*")
    elif unpriced != "deny":
        r.fail("prices.unpriced", "must be deny or {input: N, output: N} (never free)", unpriced)
    currency = r.string(m.get("currency", "USD"), "prices.currency", r"[A-Z]{3}")
    return Pricing(currency=currency, prices=prices, unpriced=default)


def parse_queue(r: Reader, raw: Any) -> QueuePolicy:
    m = r.mapping(raw, "queue", {"max_wait_s", "max_depth", "priority"})
    claim, default = None, 0
    rules: tuple[tuple[Match, int], ...] = ()
    if "priority" in m:
        pm = r.mapping(m["priority"], "queue.priority", {"claim", "default", "rules"})
        claim = r.string(pm["claim"], "queue.priority.claim") if "claim" in pm else None
        default = r.integer(pm.get("default", 0), "queue.priority.default", -1000)

        def rule(v: Any, p: str) -> tuple[Match, int]:
            rm = r.mapping(v, p, {"match", "priority"}, {"match", "priority"})
            return parse_match(r, rm["match"], f"{p}.match"), r.integer(
                rm["priority"], f"{p}.priority", -1000
            )

        rules = r.items(pm.get("rules"), "queue.priority.rules", rule)
    return QueuePolicy(
        max_wait_s=r.number(m.get("max_wait_s", 0), "queue.max_wait_s"),
        max_depth=r.integer(m.get("max_depth", 1000), "queue.max_depth", 1),
        priority_claim=claim,
        default_priority=default,
        priority_rules=rules,
    )


def _clock_time(r: Reader, raw: Any, p: str) -> time:
    if not isinstance(raw, str):  # an unquoted 09:00 is YAML 1.1's sexagesimal 540
        r.fail(p, "must be a 24-hour time like '09:00' (quoted)", raw)
    text = r.string(raw, p)
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text)
    if m is None:
        r.fail(p, "must be a 24-hour time like '09:00'", raw)
    return time(int(m.group(1)), int(m.group(2)))


def parse_schedule(r: Reader, raw: Any) -> Schedule:
    m = r.mapping(
        raw, "schedule", {"peak", "non_critical", "during_peak"}, {"peak", "non_critical"}
    )
    pk = r.mapping(m["peak"], "schedule.peak", {"days", "from", "to"}, {"from", "to"})
    days = r.strings(pk.get("days", list(_DAYS[:5])), "schedule.peak.days")
    for i, d in enumerate(days):
        if d not in _DAYS:
            r.fail(f"schedule.peak.days[{i}]", f"must be one of {', '.join(_DAYS)}", d)
    start = _clock_time(r, pk["from"], "schedule.peak.from")
    end = _clock_time(r, pk["to"], "schedule.peak.to")
    if end <= start:
        r.fail(
            "schedule.peak.to",
            "must be after peak.from (split a peak across midnight in two days)",
            pk["to"],
        )
    non_critical = r.items(
        m["non_critical"], "schedule.non_critical", lambda v, p: parse_match(r, v, p)
    )
    return Schedule(
        days=frozenset(_DAYS.index(d) for d in days),
        start=start,
        end=end,
        non_critical=non_critical,
        during_peak=cast(
            Any, r.choice(m.get("during_peak", "defer"), "schedule.during_peak", ("defer", "queue"))
        ),
    )
