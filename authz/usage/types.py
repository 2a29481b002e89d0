"""The one shape every usage parser returns, and the checks they share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["StreamReader", "TokenUsage", "count_field", "details_field"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one model call consumed, split the way providers price them.

    ``input_tokens`` are the input tokens billed at the full rate: for OpenAI that is
    ``prompt_tokens - cached_tokens``; for Anthropic ``input_tokens +
    cache_creation_input_tokens`` (a cache write costs at least a normal read).
    ``cached_input_tokens`` are the ones read from the prompt cache (Anthropic's
    ``cache_creation_input_tokens`` are also in ``cache_write_tokens``, priced apart by
    :mod:`authz.policy.prices`). ``output_tokens``
    already includes ``reasoning_tokens``, which are reported for observability only.
    ``exact`` is False when the numbers were reconstructed from a partial stream.
    """

    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0
    exact: bool = True
    # For prices only (authz.policy.prices); the ledger counts the three kinds above, and
    # equality (what was consumed) is about those: these only say how it was billed.
    cache_write_tokens: int = field(default=0, compare=False)  # of input_tokens, cached
    service_tier: str = field(default="", compare=False)  # the tier that served it ("")

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cached_input_tokens

    @property
    def total(self) -> int:
        return self.total_input + self.output_tokens


class StreamReader(Protocol):
    """What one API's stream events say about usage; SSE framing is done elsewhere.

    ``usage`` is the exact usage once the stream reported it. ``seen`` is the best
    usage known so far (Anthropic announces its input up front), ``output_chars`` the
    generated characters seen in deltas, and ``output_tokens_seen`` the largest
    cumulative output count reported so far.
    """

    usage: TokenUsage | None
    seen: TokenUsage | None
    output_chars: int
    output_tokens_seen: int

    def on_event(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Take one decoded event: its ``event:`` name ("" if none) and JSON object."""
        ...


def count_field(obj: Mapping[str, Any], key: str) -> int | None:
    """``obj[key]`` when it is a non-negative integer, else None.

    ``bool`` is rejected on purpose: it is an ``int`` subclass, and ``true`` is never a
    token count. Upstream bodies are untrusted input, so nothing here raises.
    """
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def details_field(obj: Mapping[str, Any], details_key: str, key: str) -> int:
    """``obj[details_key][key]`` as a count, 0 when absent or malformed."""
    details = obj.get(details_key)
    if isinstance(details, Mapping):
        return count_field(details, key) or 0
    return 0
