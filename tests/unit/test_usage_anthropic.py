"""Anthropic Messages usage on recorded bodies: cache reads and writes, streams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from authz.apis import Api
from authz.usage import SseUsageAccumulator, TokenUsage, parse_json_usage

pytestmark = pytest.mark.unit

BODIES = Path(__file__).parent.parent / "fixtures" / "bodies"
MESSAGES = Api.ANTHROPIC_MESSAGES


def body(name: str) -> bytes:
    return (BODIES / name).read_bytes()


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events
    )


def start(**usage: int) -> dict[str, Any]:
    return {"type": "message_start", "message": {"usage": usage}}


def delta(**usage: int) -> dict[str, Any]:
    return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}


@pytest.mark.parametrize("name", ["anthropic_message.json", "anthropic_message_cache_write.json"])
def test_json_fixtures_match_the_sdk_types(name: str) -> None:
    Message.model_validate_json(body(name))


@pytest.mark.parametrize("name", ["anthropic_stream.sse", "anthropic_thinking_tools_stream.sse"])
def test_stream_fixtures_match_the_sdk_types(name: str) -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    for line in body(name).splitlines():
        if line.startswith(b"data: ") and b'"ping"' not in line:  # the SDK has no ping type
            adapter.validate_python(json.loads(line[6:]))


def test_cache_read_and_creation() -> None:
    usage = parse_json_usage(MESSAGES, body("anthropic_message.json"))
    # input 12 + cache write 1024 are full-price input; 4096 were read from the cache.
    assert usage == TokenUsage(1036, 4096, 250)
    assert usage.total_input == 12 + 1024 + 4096


def test_cache_write_is_not_cached_input() -> None:
    usage = parse_json_usage(MESSAGES, body("anthropic_message_cache_write.json"))
    assert usage == TokenUsage(188107, 0, 393)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html>overloaded</html>",
        b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        b'{"usage":{"input_tokens":12}}',
        b'{"usage":{"output_tokens":12}}',
        b'{"usage":{"input_tokens":"12","output_tokens":3}}',
    ],
)
def test_no_usage_is_none(raw: bytes) -> None:
    assert parse_json_usage(MESSAGES, raw) is None


def test_stream_usage() -> None:
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(body("anthropic_stream.sse"))
    assert acc.usage == TokenUsage(472, 2048, 23)
    assert acc.input_tokens_seen == 472 + 2048
    assert acc.output_chars == len("Hello! Voilà — 日本語も話せます。 How can I help? 🚀")


def test_stream_with_thinking_and_tool_use() -> None:
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(body("anthropic_thinking_tools_stream.sse"))
    assert acc.usage == TokenUsage(1962, 0, 187, reasoning_tokens=96)
    thinking = "The user wants the weather in Paris. I should call get_weather with celsius."
    text = "Let me check the weather for you."
    tool_input = '{"location": "Paris, France", "unit": "celsius"}'
    # The signature_delta is opaque, not generated text.
    assert acc.output_chars == len(thinking) + len(text) + len(tool_input)


def test_usage_is_exact_only_after_message_delta() -> None:
    raw = body("anthropic_stream.sse")
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(raw[: raw.index(b"event: message_delta")])
    assert acc.usage is None
    assert acc.input_tokens_seen == 2520
    assert acc.output_tokens_seen == 2


def test_delta_input_counts_replace_the_baseline() -> None:
    # Newer API versions repeat the input counts in message_delta, cumulatively.
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(sse(start(input_tokens=10, cache_read_input_tokens=5, output_tokens=1)))
    acc.feed(sse(delta(input_tokens=30, output_tokens=40)))
    assert acc.usage == TokenUsage(30, 5, 40)


def test_output_is_cumulative_not_summed() -> None:
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(sse(start(input_tokens=10, output_tokens=1), delta(output_tokens=7)))
    acc.feed(sse(delta(output_tokens=15)))
    assert acc.usage == TokenUsage(10, 0, 15)


def test_delta_without_start_or_input_gives_no_usage() -> None:
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(sse(delta(output_tokens=15)))
    assert acc.usage is None
    assert acc.output_tokens_seen == 15


def test_event_type_from_event_line_when_json_has_none() -> None:
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(b'event: message_start\ndata: {"message":{"usage":{"input_tokens":8}}}\n\n')
    acc.feed(b'event: message_delta\ndata: {"usage":{"output_tokens":3}}\n\n')
    assert acc.usage == TokenUsage(8, 0, 3)


def test_error_event_mid_stream_is_ignored() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    acc = SseUsageAccumulator(MESSAGES)
    acc.feed(sse(start(input_tokens=10, output_tokens=1), error))
    assert acc.usage is None
    assert acc.input_tokens_seen == 10
