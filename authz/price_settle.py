"""Cost budgets brought to what the provider bills, after the settlement.

The ledger counts three kinds of tokens (input, cache reads, output) with one weight
each per counter, fixed when Check reserved: for a cost budget, the model's base rates.
What providers bill can be more: the whole call at a higher rate once its input passes
a context tier, cache writes above the input rate, a priority service tier
(:mod:`authz.policy.prices`). Teaching every ledger backend (memory, SQLite, Redis
scripts, leases, the journal) a fourth token kind and per-call rates would change all of
them; instead the settlement charges the cost budgets the difference, once, through the
ledger's idempotent :meth:`~authz.ledger.base.Ledger.charge` (id ``<reservation>|price``),
which every backend already has and the journal replays.

Only ever more, never less: a bill below the base rates (a ``flex`` or ``batch`` tier at
a factor under 1) keeps the base charge, since ``charge`` cannot give units back; set the
base rates to the tier you use most. Token budgets and rates count tokens and are not
touched. The difference goes to the cost budgets' current windows: a call settled just
after midnight pays its surcharge into the new day, as a late settle would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from authz.ledger.base import Limit
from authz.policy.model import Node, Policy, SubjectPath, Weights
from authz.policy.prices import bill
from authz.usage.types import TokenUsage

__all__ = ["price_difference", "settle_price", "subject_path"]

log = logging.getLogger("authz.settle")
_ONE_PER_UNIT = Weights(1.0, 0.0, 0.0)  # the difference is charged as input "tokens" = units


def subject_path(text: str) -> SubjectPath:
    """``org:acme/user:bob`` back to a path (names are escaped: no ``/`` or ``:`` inside)."""
    nodes = []
    for part in text.split("/") if text else ():
        level, _, name = part.partition(":")
        nodes.append(Node(level, name))
    return SubjectPath(tuple(nodes))


def price_difference(policy: Policy, model: str, usage: TokenUsage) -> int:
    """Micro-units the provider bills for ``usage`` beyond the model's base weights."""
    if not policy.has_cost_budgets:
        return 0
    price = policy.pricing.for_model(model or None)
    if price is None or not price.billed_apart:
        return 0
    return max(0, bill(price, usage) - price.weights().units(usage))


async def settle_price(
    policy: Policy,
    ledger: Any,
    limits_for: Callable[[Policy, SubjectPath, str | None], tuple[Limit, ...]],
    reservation_id: str,
    subject: str,
    model: str,
    usage: TokenUsage,
) -> int:
    """Charge the cost budgets of ``subject`` the difference; return it (0: nothing)."""
    extra = price_difference(policy, model, usage)
    if extra <= 0 or not subject:
        return 0
    cost = {b.name for b in policy.budgets if b.unit == "cost"}
    limits = tuple(
        replace(lim, weights=_ONE_PER_UNIT, per_request=0)
        for lim in limits_for(policy, subject_path(subject), model or None)
        if lim.budget in cost
    )
    if not limits:
        return 0
    try:
        await ledger.charge(f"{reservation_id}|price", limits, TokenUsage(extra, 0, 0))
    except Exception:  # the settle itself went through: only the difference is lost
        log.exception("price difference of %s (%d units) not charged", reservation_id, extra)
        return 0
    log.debug("priced %s: %d units beyond the base rates", reservation_id, extra)
    return extra
