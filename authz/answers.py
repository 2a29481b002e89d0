"""How decisions are worded: quota headers, denial messages, warnings.

Pure functions of the ledger's answer and the time: the enforcer decides, this module
says it, so the wording (which clients and operators read) lives in one place.
"""

from __future__ import annotations

from dataclasses import replace

from authz.admission import PlannedLimit
from authz.decision import Decision, DenyReason, Quota, Verdict
from authz.ledger.base import Refusal, Reservation

__all__ = [
    "budget_denial",
    "duration",
    "local_denial",
    "quota_for",
    "rate_denial",
    "reset_header",
    "warnings_for",
]


def duration(seconds: float) -> str:
    s = max(0, int(seconds + 0.999))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else (f"{m}m{s}s" if m else f"{s}s")


def reset_header(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-tokens, e.g. ``6m0s``."""
    return duration(seconds)


def quota_for(plan: tuple[PlannedLimit, ...], res: Reservation, now: float) -> Quota | None:
    # The x-ratelimit-*-tokens headers describe the token budget with the least left.
    best: Quota | None = None
    for p, left in zip(plan, res.remaining, strict=True):
        if p.budget is None or p.budget.unit != "tokens" or not p.budget.enforce:
            continue  # an audit-only budget speaks in a warning (warnings_for), not here
        if best is None or left < best.remaining:
            lim = p.limit
            best = Quota(lim.budget, lim.node, lim.amount, left, max(0.0, lim.window_end - now))
    return best


def budget_denial(allow: Decision, refusal: Refusal, now: float) -> Decision:
    lim = refusal.limit
    reset = max(0.0, lim.window_end - now)
    msg = (
        f"Token budget '{lim.budget}' for {lim.node} is exhausted: {refusal.remaining} of "
        f"{lim.amount} tokens left, this request needs {refusal.requested}; "
        f"resets in {duration(reset)}."
    )
    quota = Quota(lim.budget, lim.node, lim.amount, refusal.remaining, reset)
    return replace(
        allow, verdict=Verdict.DENY, status=429, reason=DenyReason.BUDGET_EXHAUSTED,
        detail=lim.budget, message=msg, quota=quota, retry_after_s=reset,
    )  # fmt: skip


def local_denial(allow: Decision, refusal: Refusal) -> Decision:
    # The breaker's local allowance (ledger.breaker.mode: local_allowance) is used up,
    # not the budget: retryable once the store is back, hence rate_limited.
    lim, retry = refusal.limit, refusal.retry_after_s or 1.0
    msg = (
        f"The token quota service is unreachable and this gateway's local allowance for "
        f"'{lim.budget}' on {lim.node} is used up: {refusal.remaining} left, this request "
        f"needs {refusal.requested}; retry in {duration(retry)}."
    )
    return replace(
        allow, verdict=Verdict.DENY, status=429, reason=DenyReason.RATE_LIMITED,
        detail="local_allowance", message=msg, retry_after_s=retry,
    )  # fmt: skip


def rate_denial(allow: Decision, refusal: Refusal, why: str, detail: str, now: float) -> Decision:
    lim = refusal.limit
    # A concurrency cap has no window: a slot may free any moment.
    reset = 1.0 if lim.key.endswith("|c") else max(1.0, lim.window_end - now)
    msg = (
        f"Rate '{lim.budget}' for {lim.node}: {why}; {refusal.remaining} of {lim.amount} left "
        f"this minute, this request needs {refusal.requested}; retry in {duration(reset)}."
    )
    return replace(
        allow, verdict=Verdict.DENY, status=429, reason=DenyReason.RATE_LIMITED,
        detail=detail or lim.budget, message=msg, retry_after_s=reset,
    )  # fmt: skip


def warnings_for(plan: tuple[PlannedLimit, ...], res: Reservation) -> tuple[str, ...]:
    """Soft budgets past their amount, burst budgets borrowing from the next period, and
    audit-only budgets (``enforce: false``) that would have refused the request."""
    out = []
    for p, left, units in zip(plan, res.remaining, res.units, strict=True):
        b = p.budget
        if b is not None and not b.enforce and left < 0:
            out.append(
                f"audit-only budget '{b.name}' for {p.limit.node} would have refused this "
                f"request: it needs {units}, {max(0, left + units)} of {p.limit.amount} left"
            )
            continue
        if b is None or not (b.soft_grace or b.burst):
            continue
        used = p.limit.amount - left
        if used > b.tokens:
            kind = "borrowing from the next period" if b.burst else "over its soft limit"
            out.append(
                f"budget '{b.name}' for {p.limit.node} is {kind}: {used} of {b.tokens}; "
                f"hard stop at {p.limit.amount}"
            )
    return tuple(out)
