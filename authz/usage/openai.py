"""OpenAI usage objects and streamed deltas -> TokenUsage and generated characters.

Two usage dialects exist. Chat Completions, legacy Completions and Embeddings report
``prompt_tokens`` / ``completion_tokens`` with ``prompt_tokens_details.cached_tokens`` and
``completion_tokens_details.reasoning_tokens``. The Responses API reports
``input_tokens`` / ``output_tokens`` with ``input_tokens_details.cached_tokens`` and
``output_tokens_details.reasoning_tokens``. In both, the cached tokens are part of the
prompt count and the reasoning tokens are part of the output count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from authz.usage.types import TokenUsage, count_field, details_field

__all__ = [
    "RESPONSES_FINAL_EVENTS",
    "ChatStream",
    "ResponsesStream",
    "chat_chunk_chars",
    "chat_usage",
    "responses_event_chars",
    "responses_usage",
    "with_tier",
]

# Every way a Responses stream can end carries the final ``response`` with its usage:
# ``response.incomplete`` is what a stream cut by ``max_output_tokens`` ends with, and
# those tokens were generated and billed just the same.
RESPONSES_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

# Deltas of text the model generates. ``output_text.done`` and friends repeat the whole
# text and are deliberately absent, or every character would count twice.
_RESPONSES_DELTA_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
    }
)


def _split(prompt: int, cached: int, output: int, reasoning: int) -> TokenUsage:
    # A provider reporting more cached than prompt tokens (seen on OpenAI-compatible
    # servers) must not produce a negative charge: clamp rather than trust.
    cached = min(cached, prompt)
    return TokenUsage(
        input_tokens=prompt - cached,
        cached_input_tokens=cached,
        output_tokens=output,
        reasoning_tokens=min(reasoning, output),
    )


def chat_usage(usage: object) -> TokenUsage | None:
    """A Chat Completions / Completions / Embeddings ``usage`` object, or None."""
    if not isinstance(usage, Mapping):
        return None
    prompt = count_field(usage, "prompt_tokens")
    if prompt is None:
        return None
    # Embeddings report no completion_tokens at all: they generate nothing. One that is
    # there but no count (negative, 1.5, "9") is not "none": the usage is unreadable.
    output = count_field(usage, "completion_tokens")
    if output is None:
        if usage.get("completion_tokens") is not None:
            return None
        output = 0
    return _split(
        prompt,
        details_field(usage, "prompt_tokens_details", "cached_tokens"),
        output,
        details_field(usage, "completion_tokens_details", "reasoning_tokens"),
    )


def responses_usage(usage: object) -> TokenUsage | None:
    """A Responses API ``usage`` object, or None."""
    if not isinstance(usage, Mapping):
        return None
    prompt = count_field(usage, "input_tokens")
    output = count_field(usage, "output_tokens")
    if prompt is None or output is None:
        return None
    return _split(
        prompt,
        details_field(usage, "input_tokens_details", "cached_tokens"),
        output,
        details_field(usage, "output_tokens_details", "reasoning_tokens"),
    )


def with_tier(usage: TokenUsage | None, response: Mapping[str, Any]) -> TokenUsage | None:
    """``usage`` with the ``service_tier`` the response (or stream chunk) reports:
    ``default``, ``priority``, ``flex``... which prices apart (authz.policy.prices)."""
    tier = response.get("service_tier")
    if usage is None or not isinstance(tier, str) or not tier or len(tier) > 32:
        return usage
    return replace(usage, service_tier=tier)


def _text_len(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    return len(value) if isinstance(value, str) else 0


def chat_chunk_chars(chunk: Mapping[str, Any]) -> int:
    """Generated characters in one ``chat.completion.chunk`` or ``text_completion`` chunk.

    Counts content, ``reasoning_content`` (DeepSeek, vLLM), refusals, and tool call names
    and arguments: all are output tokens the caller pays for.
    """
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return 0
    total = 0
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        total += _text_len(choice, "text")  # legacy Completions streams
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            continue
        for key in ("content", "reasoning_content", "refusal"):
            total += _text_len(delta, key)
        functions: list[object] = [delta.get("function_call")]  # deprecated single-call form
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            functions += [call.get("function") for call in calls if isinstance(call, Mapping)]
        for function in functions:
            if isinstance(function, Mapping):
                total += _text_len(function, "name") + _text_len(function, "arguments")
    return total


def responses_event_chars(event_type: str, event: Mapping[str, Any]) -> int:
    """Generated characters in one Responses API stream event."""
    if event_type in _RESPONSES_DELTA_EVENTS:
        return _text_len(event, "delta")
    return 0


class ChatStream:
    """Chat Completions / Completions stream: the last non-null ``usage`` wins.

    With ``stream_options.include_usage`` every chunk carries ``"usage": null`` and one
    extra chunk with empty ``choices`` carries the totals just before ``[DONE]``.
    """

    __slots__ = ("output_chars", "output_tokens_seen", "seen", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.seen: TokenUsage | None = None
        self.output_chars = 0
        self.output_tokens_seen = 0

    def on_event(self, event_type: str, data: Mapping[str, Any]) -> None:
        self.output_chars += chat_chunk_chars(data)
        usage = with_tier(chat_usage(data.get("usage")), data)
        if usage is not None:
            self.usage = self.seen = usage
            self.output_tokens_seen = usage.output_tokens


class ResponsesStream:
    """Responses API stream: usage arrives once, inside the final ``response`` object."""

    __slots__ = ("output_chars", "output_tokens_seen", "seen", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.seen: TokenUsage | None = None
        self.output_chars = 0
        self.output_tokens_seen = 0

    def on_event(self, event_type: str, data: Mapping[str, Any]) -> None:
        # The JSON ``type`` is authoritative; the ``event:`` line only repeats it.
        kind = data.get("type")
        if not isinstance(kind, str):
            kind = event_type
        self.output_chars += responses_event_chars(kind, data)
        if kind in RESPONSES_FINAL_EVENTS:
            response = data.get("response")
            if not isinstance(response, Mapping):
                return
            usage = with_tier(responses_usage(response.get("usage")), response)
            if usage is not None:
                self.usage = self.seen = usage
                self.output_tokens_seen = usage.output_tokens
