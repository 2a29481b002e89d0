"""SSE framing: the same usage however the recorded streams are cut into chunks."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from authz.apis import Api
from authz.estimate import tokens_for_chars
from authz.usage import SseUsageAccumulator, TokenUsage, usage_after_abort

pytestmark = pytest.mark.unit

BODIES = Path(__file__).parent.parent / "fixtures" / "bodies"

# fixture, api, exact usage, generated characters in its deltas (counted by hand)
STREAMS = [
    ("openai_chat_stream.sse", Api.OPENAI_CHAT, TokenUsage(139, 1152, 12), 38),
    ("openai_chat_tools_stream.sse", Api.OPENAI_CHAT, TokenUsage(82, 0, 18), 56),
    ("openai_completions_stream.sse", Api.OPENAI_COMPLETIONS, TokenUsage(5, 0, 7), 23),
    ("openai_responses_stream.sse", Api.OPENAI_RESPONSES, TokenUsage(37, 0, 12), 39),
    ("anthropic_stream.sse", Api.ANTHROPIC_MESSAGES, TokenUsage(472, 2048, 23), 42),
    (
        "anthropic_thinking_tools_stream.sse",
        Api.ANTHROPIC_MESSAGES,
        TokenUsage(1962, 0, 187, reasoning_tokens=96),
        157,
    ),
]
STREAM_IDS = [s[0] for s in STREAMS]


def body(name: str) -> bytes:
    return (BODIES / name).read_bytes()


def run(api: Api, *chunks: bytes) -> SseUsageAccumulator:
    acc = SseUsageAccumulator(api)
    for chunk in chunks:
        acc.feed(chunk)
    return acc


@pytest.mark.parametrize(("name", "api", "usage", "chars"), STREAMS, ids=STREAM_IDS)
def test_whole_body(name: str, api: Api, usage: TokenUsage, chars: int) -> None:
    acc = run(api, body(name))
    assert acc.usage == usage
    assert acc.output_chars == chars


@pytest.mark.parametrize(("name", "api", "usage", "chars"), STREAMS, ids=STREAM_IDS)
def test_every_split_point(name: str, api: Api, usage: TokenUsage, chars: int) -> None:
    # Includes splits inside multi-byte characters (the fixtures hold é, ☕, 日本語, emoji).
    raw = body(name)
    for i in range(len(raw) + 1):
        acc = run(api, raw[:i], raw[i:])
        assert (acc.usage, acc.output_chars) == (usage, chars), f"split at byte {i}"


@pytest.mark.parametrize(("name", "api", "usage", "chars"), STREAMS, ids=STREAM_IDS)
def test_one_byte_at_a_time(name: str, api: Api, usage: TokenUsage, chars: int) -> None:
    raw = body(name)
    acc = run(api, *(raw[i : i + 1] for i in range(len(raw))))
    assert (acc.usage, acc.output_chars) == (usage, chars)


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
@pytest.mark.parametrize(("name", "api", "usage", "chars"), STREAMS, ids=STREAM_IDS)
def test_other_line_endings_at_every_split(
    name: str, api: Api, usage: TokenUsage, chars: int, newline: bytes
) -> None:
    # Raw LF bytes only occur as line ends in these fixtures (JSON escapes its own).
    raw = body(name).replace(b"\n", newline)
    for i in range(len(raw) + 1):
        acc = run(api, raw[:i], raw[i:])
        assert (acc.usage, acc.output_chars) == (usage, chars), f"split at byte {i}"


def test_cr_then_lf_in_separate_chunks_is_one_line_end() -> None:
    # If the CR and LF counted as two line ends, the blank line would end the event
    # between its two data lines, and neither half is JSON.
    acc = run(Api.OPENAI_CHAT, b'data: {"usage":\r', b'\ndata: {"prompt_tokens":3}}\r\n\r\n')
    assert acc.usage == TokenUsage(3, 0, 0)


def test_multi_line_data_is_joined_with_newlines() -> None:
    event = b'data: {"choices":[{"delta":\ndata: {"content":"abc"}}],\ndata: "usage":null}\n\n'
    assert run(Api.OPENAI_CHAT, event).output_chars == 3
    # Joined with a newline, "1" and "2" are two numbers (invalid JSON), never 12.
    split_number = b'data: {"usage":{"prompt_tokens":1\ndata: 2,"completion_tokens":3}}\n\n'
    assert run(Api.OPENAI_CHAT, split_number).usage is None


def test_comments_done_non_json_and_unknown_fields_are_ignored() -> None:
    stream = (
        b": keep-alive\n\n"
        b"retry: 3000\nid: 7\n\n"
        b"data: not json\n\n"
        b"data: [1, 2]\n\n"
        b'data:{"choices":[{"delta":{"content":"hey"}}]}\n\n'  # no space after the colon
        b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n'
        b'data: {"choices":[],"usage":null}\n\n'  # a later null must not erase it
        b"data: [DONE]\n\n"
    )
    acc = run(Api.OPENAI_CHAT, stream)
    assert acc.usage == TokenUsage(9, 0, 2)
    assert acc.output_chars == 3


def test_last_usage_wins() -> None:
    stream = (
        b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
        b'data: {"usage":{"prompt_tokens":5,"completion_tokens":8}}\n\n'
    )
    assert run(Api.OPENAI_CHAT, stream).usage == TokenUsage(5, 0, 8)


def test_event_without_trailing_blank_line_needs_finish() -> None:
    acc = run(Api.OPENAI_CHAT, b'data: {"usage":{"prompt_tokens":4,"completion_tokens":6}}')
    assert acc.usage is None
    acc.finish()
    assert acc.usage == TokenUsage(4, 0, 6)
    acc.finish()  # idempotent
    assert acc.usage == TokenUsage(4, 0, 6)


def test_oversized_line_is_dropped_and_parsing_resumes() -> None:
    acc = SseUsageAccumulator(Api.OPENAI_CHAT, max_event_bytes=1024)
    acc.feed(b'data: {"choices":[{"delta":{"content":"' + b"x" * 600)
    acc.feed(b"x" * 600 + b'"}}]}\n\n')
    acc.feed(b'data: {"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n')
    assert acc.output_chars == 0
    assert acc.usage == TokenUsage(2, 0, 3)


def test_oversized_event_of_many_data_lines_is_dropped() -> None:
    # Valid JSON once joined (whitespace lines), but over the cap: the event is dropped.
    acc = SseUsageAccumulator(Api.OPENAI_CHAT, max_event_bytes=1024)
    acc.feed(b'data: {"usage":{"prompt_tokens":50,"completion_tokens":50},\n')
    acc.feed(b"data:  \n" * 600 + b'data: "x":1}\n\n')
    acc.feed(b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n')
    assert acc.usage is None
    assert acc.output_chars == 2


def test_rest_of_an_event_with_an_oversized_line_is_dropped() -> None:
    # The line overflows exactly at a chunk end; its LF must not pass for a blank line
    # that would end the event and let the event's later lines through.
    acc = SseUsageAccumulator(Api.OPENAI_CHAT, max_event_bytes=1024)
    acc.feed(b"data: " + b"x" * 2000)
    acc.feed(b'\ndata: {"usage":{"prompt_tokens":50,"completion_tokens":50}}\n\n')
    assert acc.usage is None
    acc.feed(b'data: {"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n')
    assert acc.usage == TokenUsage(2, 0, 3)


def test_a_stream_without_newlines_does_not_grow_memory() -> None:
    acc = SseUsageAccumulator(Api.OPENAI_CHAT, max_event_bytes=1 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(32):  # 32 MiB, each chunk a fresh object
            acc.feed(bytes([48 + i % 10]) * (1 << 20))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 3 << 20


def test_chunks_are_not_rescanned() -> None:
    # A 300 kB event fed one byte at a time: joining or scanning the held bytes on every
    # chunk would be quadratic (tens of seconds); holding them is linear.
    content = "y" * 300_000
    raw = json.dumps({"choices": [{"delta": {"content": content}}]}).encode()
    acc = SseUsageAccumulator(Api.OPENAI_CHAT)
    # CPU time of this thread, not wall time: a loaded machine stretches the latter.
    started = time.thread_time()
    acc.feed(b"data: ")
    for i in range(len(raw)):
        acc.feed(raw[i : i + 1])
    acc.feed(b"\n\n")
    assert time.thread_time() - started < 5
    assert acc.output_chars == len(content)


def test_abort_mid_stream_estimates_from_text() -> None:
    raw = body("openai_chat_stream.sse")
    cut = raw.index(b"croissant")  # inside the 7th chunk: 22 characters seen before it
    acc = run(Api.OPENAI_CHAT, raw[:cut])
    assert acc.usage is None
    assert acc.output_chars == 22
    assert usage_after_abort(acc, 1300) == TokenUsage(1300, 0, 6, exact=False)


def test_abort_anthropic_keeps_announced_input() -> None:
    raw = body("anthropic_stream.sse")
    acc = run(Api.ANTHROPIC_MESSAGES, raw[: raw.index(b"event: message_delta")])
    assert acc.usage is None
    assert acc.input_tokens_seen == 2520
    # 42 characters -> 11 tokens, more than the 2 message_start reported.
    assert usage_after_abort(acc, 99) == TokenUsage(472, 2048, 11, exact=False)


def test_abort_uses_reported_output_when_larger_than_text() -> None:
    raw = body("anthropic_stream.sse")
    acc = run(Api.ANTHROPIC_MESSAGES, raw[: raw.index(b"event: content_block_start")])
    assert acc.output_chars == 0
    assert usage_after_abort(acc, 99) == TokenUsage(472, 2048, 2, exact=False)


def test_abort_after_usage_returns_exact_usage() -> None:
    raw = body("openai_chat_stream.sse")
    acc = run(Api.OPENAI_CHAT, raw[: raw.index(b"data: [DONE]")])
    assert usage_after_abort(acc, 5) == TokenUsage(139, 1152, 12)


@pytest.mark.parametrize(("text", "tokens"), [("a", 1), ("abcd", 1), ("abcde", 2)])
def test_abort_never_charges_zero_output_for_seen_text(text: str, tokens: int) -> None:
    event = json.dumps({"choices": [{"delta": {"content": text}}]}).encode()
    acc = run(Api.OPENAI_CHAT, b"data: " + event + b"\n\n")
    result = usage_after_abort(acc, 10)
    assert result == TokenUsage(10, 0, tokens, exact=False)
    assert result.output_tokens == tokens_for_chars(len(text))


def test_abort_before_any_output() -> None:
    acc = run(Api.OPENAI_RESPONSES, b"event: response.created\ndata: {")
    assert usage_after_abort(acc, 40) == TokenUsage(40, 0, 0, exact=False)
    assert usage_after_abort(acc, -3).input_tokens == 0
