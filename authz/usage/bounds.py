"""Bounds on what one settlement may charge: reported usage is a claim, not a fact.

The upstream's usage numbers decide what a budget is charged, and an upstream (or
anything that can forge its answer) can claim ``prompt_tokens: 10**18``. Two bounds:

- :func:`bound_usage`, applied to every settlement the response path builds, before any
  ledger sees it: input above what the request could have read (its input estimate
  times a factor, plus slack) and output above what it could have generated (its output
  reservation times a factor, plus slack), or a listed model's own maxima, is clamped
  to the bound; the caller logs, counts and audits the :class:`SettlementBound`.
- :func:`ledger_usage`, applied by every ledger to whatever it is given (a settle, a
  journal replay, a direct call): each count is clamped to [0, :data:`LEDGER_MAX_TOKENS`]
  so that memory, Redis and Redis Cluster agree. Lua numbers are doubles: past 2**53 they
  lose integers, and Redis' HINCRBY refuses ``1e+18``, which left a reservation open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from authz.policy.bounds import UsageBounds
from authz.usage.types import TokenUsage

__all__ = ["LEDGER_MAX_TOKENS", "SettlementBound", "bound_usage", "ledger_usage"]

log = logging.getLogger("authz.usage.bounds")

# The most any ledger counts for one kind of token in one settlement or charge. A billion
# is 100x the largest context window offered today, and with weights up to 10**6 the
# weighted units (3 kinds x 10**9 x 10**6) stay below 2**53, where doubles (Lua) are exact.
LEDGER_MAX_TOKENS = 10**9


@dataclass(frozen=True, slots=True)
class SettlementBound:
    """A settlement that did not charge what the upstream said (log, metric, audit)."""

    reason: str  # usage_above_bound | decoded_too_large | encoding_unsupported | copy_truncated
    reservation_id: str
    org: str
    model: str
    reported: TokenUsage | None  # what the upstream claimed (None: could not be read)
    charged: TokenUsage
    max_input: int
    max_output: int

    def as_dict(self) -> dict[str, object]:
        """For the audit entry and the log line: counts only, never content."""

        def counts(u: TokenUsage | None) -> dict[str, int] | None:
            if u is None:
                return None
            return {"input": u.input_tokens, "cached_input": u.cached_input_tokens,
                    "output": u.output_tokens}  # fmt: skip

        return {
            "reason": self.reason,
            "reservation": self.reservation_id,
            "org": self.org,
            "model": self.model,
            "reported": counts(self.reported),
            "charged": counts(self.charged),
            "max_input": self.max_input,
            "max_output": self.max_output,
        }


def _count(value: int) -> int:
    return min(max(value, 0), LEDGER_MAX_TOKENS)


def ledger_usage(usage: TokenUsage) -> TokenUsage:
    """``usage`` with every count within [0, LEDGER_MAX_TOKENS] (the same object if so)."""
    i, c, o = usage.input_tokens, usage.cached_input_tokens, usage.output_tokens
    top = LEDGER_MAX_TOKENS
    if 0 <= i <= top and 0 <= c <= top and 0 <= o <= top and 0 <= usage.reasoning_tokens <= o:
        return usage
    out = _count(o)
    clamped = TokenUsage(_count(i), _count(c), out, min(_count(usage.reasoning_tokens), out),
                         exact=False)  # fmt: skip
    log.warning("ledger clamped usage %s to %s", usage, clamped)
    return clamped


def bound_usage(
    usage: TokenUsage, bounds: UsageBounds, model: str, input_estimate: int, output_reserved: int
) -> tuple[TokenUsage, tuple[int, int] | None]:
    """``usage`` clamped to what this request could have cost, and the (input, output)
    maxima when it had to be clamped (None when the usage was within them).

    Input over the bound keeps its full-price part first (cached input is cheaper), so
    a clamp never turns full-price tokens into cached ones.
    """
    max_in, max_out = bounds.limits(model, input_estimate, output_reserved)
    if usage.total_input <= max_in and usage.output_tokens <= max_out:
        return usage, None
    full = min(usage.input_tokens, max_in)
    cached = min(usage.cached_input_tokens, max_in - full)
    output = min(usage.output_tokens, max_out)
    clamped = TokenUsage(full, cached, output, min(usage.reasoning_tokens, output), exact=False)
    return clamped, (max_in, max_out)
