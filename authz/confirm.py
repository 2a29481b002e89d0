"""Tentative holds: a Check's reservation is kept in full only once the gateway used it.

Envoy waits ``grpc_service.timeout`` for a Check. A loaded machine can make an answer
that the service sent in time reach Envoy after that timer fired: the client got
Envoy's ``status_on_error``, the request never reached the model, and nothing will ever
settle the reservation. Watching our own side of the call
(:mod:`authz.envoy.unanswered`) catches a Check finished too late, not an answer late
on the wire. That hold stayed for ``reservations.ttl_s`` and was then charged its
expiry amount: the one drift left in issue 10's replicated stress runs (run 4 of the
2026-12-01 series: 205 units held, two counters, after every response had ended).

So a hold made for a gateway that confirms (Envoy: ``CheckInput.confirmed_later``)
starts **tentative**: deadline ``reservations.confirm_s`` (10 s) away, expiry charge 0.
The first message of the request's ext_proc stream, whose handle verifies, confirms it
(:meth:`Ledger.confirm`): deadline ``ttl_s`` from then, expiry charge per
``on_expiry``. Envoy opens that stream right after it takes the Check's answer (at the
request body), so 10 s is ample; a confirmation later than that (a bodiless request
whose stream opens at the response, a store that did not answer) finds the hold
released at 0, and the settlement that follows corrects the charge as a late settle
does (ledgers keep expired records ``remember_expired_s``): exact, though that one
request's hold was not kept meanwhile.

What it costs: one ledger write per request, off the request path (a task beside the
ext_proc stream). What it changes: a reservation whose ext_proc stream never opened
(ext_proc unreachable with ``failure_mode_allow``) is released at 0 after ``confirm_s``
instead of charged its input estimate after ``ttl_s``; its settlement was lost either
way. Leases (``?lease=on``) do not confirm: their holds live ``ttl_s`` at once, as
before. ``confirm_s: 0`` turns this off.
"""

from __future__ import annotations

from typing import Any

from authz.clock import Clock
from authz.policy.model import Policy
from authz.usage.types import TokenUsage

__all__ = ["FULL_HOLD", "confirm", "tentative"]

# A CheckRequest context extension saying no ext_proc stream will confirm this Check's
# hold (the HTTP check port: Kong settles over HTTP). Only the gateway reaches the
# ports, and the extension can only make a hold longer, never free.
FULL_HOLD = "authz.full_hold"

_FREE = TokenUsage(0, 0, 0)


def tentative(policy: Policy, ledger: Any) -> tuple[float, TokenUsage | None]:
    """(seconds a new hold lives, its expiry charge: None for the policy's), for a
    Check whose gateway confirms the holds it uses."""
    r = policy.reservations
    if r.confirm_s <= 0 or not getattr(ledger, "confirms", False):
        return r.ttl_s, None
    return min(r.confirm_s, r.ttl_s), _FREE


async def confirm(
    policy: Policy,
    ledger: Any,
    clock: Clock,
    reservation_id: str,
    input_estimate: int,
    output_reserved: int,
) -> bool:
    """Hold ``reservation_id`` for ``ttl_s`` from now, charged per ``on_expiry`` then.

    False if the ledger does not confirm, or no longer holds it (settled, or released
    at 0 because the confirmation came after ``confirm_s``)."""
    r = policy.reservations
    if r.confirm_s <= 0 or not getattr(ledger, "confirms", False):
        return False
    charge = TokenUsage(max(input_estimate, 0), 0, 0)
    if r.on_expiry == "reserved":
        charge = TokenUsage(max(input_estimate, 0), 0, max(output_reserved, 0))
    ok: bool = await ledger.confirm(reservation_id, clock.now() + r.ttl_s, charge)
    return ok
