"""Anthropic Messages usage -> TokenUsage, for whole responses and for streams.

Anthropic splits input three ways: ``input_tokens`` (after the last cache breakpoint),
``cache_creation_input_tokens`` (written to the cache, billed above the base rate) and
``cache_read_input_tokens`` (read from the cache, billed at a fraction). Only the reads
are "cached" in :class:`TokenUsage`; a cache write is full-price input at least.

In a stream, ``message_start`` carries the input counts and a token or so of output;
``message_delta`` carries the *cumulative* output (newer API versions repeat the input
counts there too, also cumulatively). The usage is therefore exact only once a
``message_delta`` with usage was seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.usage.types import TokenUsage, count_field, details_field

__all__ = ["MessagesStream", "message_usage"]

_COUNT_KEYS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)

# Generated text by delta type. ``signature_delta`` (an opaque integrity token) and
# ``citations_delta`` (references into the prompt) are not generated text.
_DELTA_TEXT_KEYS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


def _counts(usage: Mapping[str, Any]) -> dict[str, int] | None:
    """The count fields present in ``usage``; thinking tokens under their own key. None
    when one is present but no count (negative, 1.5, "9"): dropping it alone would
    charge a cache write or the output as zero."""
    counts = {k: v for k in _COUNT_KEYS if (v := count_field(usage, k)) is not None}
    if len(counts) != sum(usage.get(k) is not None for k in _COUNT_KEYS):
        return None
    if isinstance(usage.get("output_tokens_details"), Mapping):
        counts["thinking_tokens"] = details_field(usage, "output_tokens_details", "thinking_tokens")
    return counts


def _from_counts(counts: Mapping[str, int], tier: str = "") -> TokenUsage | None:
    if "input_tokens" not in counts:
        return None
    output = counts.get("output_tokens", 0)
    return TokenUsage(
        input_tokens=counts["input_tokens"] + counts.get("cache_creation_input_tokens", 0),
        cached_input_tokens=counts.get("cache_read_input_tokens", 0),
        output_tokens=output,
        reasoning_tokens=min(counts.get("thinking_tokens", 0), output),
        cache_write_tokens=counts.get("cache_creation_input_tokens", 0),
        service_tier=tier,
    )


def _tier(usage: Mapping[str, Any]) -> str:
    """``usage.service_tier`` (standard, priority, batch), bounded: a label, not a blob."""
    tier = usage.get("service_tier")
    return tier if isinstance(tier, str) and len(tier) <= 32 else ""


def message_usage(usage: object) -> TokenUsage | None:
    """The ``usage`` object of a complete Messages response, or None."""
    if not isinstance(usage, Mapping) or count_field(usage, "output_tokens") is None:
        return None
    counts = _counts(usage)
    return None if counts is None else _from_counts(counts, _tier(usage))


class MessagesStream:
    """Messages API stream events -> usage (see the module docstring)."""

    __slots__ = ("_counts", "_tier", "output_chars", "output_tokens_seen", "seen", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.seen: TokenUsage | None = None
        self.output_chars = 0
        self.output_tokens_seen = 0
        self._counts: dict[str, int] = {}
        self._tier = ""

    def on_event(self, event_type: str, data: Mapping[str, Any]) -> None:
        kind = data.get("type")
        if not isinstance(kind, str):
            kind = event_type
        if kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, Mapping):
                key = _DELTA_TEXT_KEYS.get(str(delta.get("type")))
                text = delta.get(key) if key else None
                if isinstance(text, str):
                    self.output_chars += len(text)
        elif kind == "message_start":
            message = data.get("message")
            usage = message.get("usage") if isinstance(message, Mapping) else None
            if isinstance(usage, Mapping):
                self._update(usage, final=False)
        elif kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, Mapping) and count_field(usage, "output_tokens") is not None:
                self._update(usage, final=True)

    def _update(self, usage: Mapping[str, Any], *, final: bool) -> None:
        # Later numbers are cumulative, so they replace earlier ones key by key; a key
        # the delta leaves out keeps the value message_start gave it.
        counts = _counts(usage)
        if counts is None:
            return  # an unreadable event: the stream settles from what else it showed
        self._counts.update(counts)
        self._tier = _tier(usage) or self._tier
        self.seen = _from_counts(self._counts, self._tier)
        self.output_tokens_seen = max(self.output_tokens_seen, self._counts.get("output_tokens", 0))
        if final and self.seen is not None:
            self.usage = self.seen
