"""OpenAI usage parsers on recorded Chat, Completions, Embeddings and Responses bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from authz.apis import Api
from authz.usage import SseUsageAccumulator, TokenUsage, parse_json_usage

pytestmark = pytest.mark.unit

BODIES = Path(__file__).parent.parent / "fixtures" / "bodies"


def body(name: str) -> bytes:
    return (BODIES / name).read_bytes()


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    lines = (line for line in raw.splitlines() if line.startswith(b"data: "))
    return [json.loads(line[6:]) for line in lines if line != b"data: [DONE]"]


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("openai_chat.json", ChatCompletion),
        ("openai_completions.json", Completion),
        ("openai_embeddings.json", CreateEmbeddingResponse),
        ("openai_responses.json", Response),
    ],
)
def test_json_fixtures_match_the_sdk_types(name: str, model: type[BaseModel]) -> None:
    # The hand-written bodies must be what the API sends: the official SDK's types say so.
    model.model_validate_json(body(name))


@pytest.mark.parametrize(
    ("name", "adapter"),
    [
        ("openai_chat_stream.sse", TypeAdapter(ChatCompletionChunk)),
        ("openai_chat_tools_stream.sse", TypeAdapter(ChatCompletionChunk)),
        ("openai_responses_stream.sse", TypeAdapter(ResponseStreamEvent)),
    ],
)
def test_stream_fixtures_match_the_sdk_types(name: str, adapter: TypeAdapter[Any]) -> None:
    for event in sse_events(body(name)):
        adapter.validate_python(event)


def test_chat_with_cached_and_reasoning_tokens() -> None:
    usage = parse_json_usage(Api.OPENAI_CHAT, body("openai_chat.json"))
    # prompt 2133 of which 1920 cached; completion 278 of which 256 reasoning.
    assert usage == TokenUsage(213, 1920, 278, reasoning_tokens=256)
    assert usage.total_input == 2133
    assert usage.total == 2411


def test_completions() -> None:
    usage = parse_json_usage(Api.OPENAI_COMPLETIONS, body("openai_completions.json"))
    assert usage == TokenUsage(5, 0, 7)


def test_embeddings_have_no_output() -> None:
    usage = parse_json_usage(Api.OPENAI_EMBEDDINGS, body("openai_embeddings.json"))
    assert usage == TokenUsage(8, 0, 0)


def test_responses_with_cached_and_reasoning_tokens() -> None:
    usage = parse_json_usage(Api.OPENAI_RESPONSES, body("openai_responses.json"))
    assert usage == TokenUsage(310, 1536, 692, reasoning_tokens=512)
    assert usage.total == 2538


def test_responses_dialect_is_not_read_as_chat() -> None:
    # The two dialects use different keys; reading one as the other finds nothing.
    assert parse_json_usage(Api.OPENAI_CHAT, body("openai_responses.json")) is None
    assert parse_json_usage(Api.OPENAI_RESPONSES, body("openai_chat.json")) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"usage": {"prompt_tokens": 3',
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"id": "chatcmpl-1"}',
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": true, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": -1, "completion_tokens": 3}}',
        b'{"usage": {"prompt_tokens": 1.5, "completion_tokens": 3}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=lambda raw: raw[:24].decode("ascii", "replace"),
)
def test_no_usage_is_none_never_an_error(raw: bytes) -> None:
    assert parse_json_usage(Api.OPENAI_CHAT, raw) is None


def test_cached_above_prompt_is_clamped() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 12},
    }
    raw = json.dumps({"usage": usage}).encode()
    assert parse_json_usage(Api.OPENAI_CHAT, raw) == TokenUsage(0, 10, 4)


def test_malformed_details_count_as_zero() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "prompt_tokens_details": None,
        "completion_tokens_details": {"reasoning_tokens": "x"},
    }
    raw = json.dumps({"usage": usage}).encode()
    assert parse_json_usage(Api.OPENAI_CHAT, raw) == TokenUsage(10, 0, 4)


def test_chat_stream_usage_and_text() -> None:
    acc = SseUsageAccumulator(Api.OPENAI_CHAT)
    acc.feed(body("openai_chat_stream.sse"))
    assert acc.usage == TokenUsage(139, 1152, 12)
    assert acc.output_chars == len("Bonjour ! Un café ☕ et un croissant 🥐.")
    assert acc.output_tokens_seen == 12


def test_chat_stream_counts_tool_call_names_and_arguments() -> None:
    acc = SseUsageAccumulator(Api.OPENAI_CHAT)
    acc.feed(body("openai_chat_tools_stream.sse"))
    arguments = '{"location":"Paris, France","unit":"celsius"}'
    assert acc.output_chars == len("get_weather") + len(arguments)
    assert acc.usage == TokenUsage(82, 0, 18)


def test_chat_stream_counts_reasoning_content_and_refusals() -> None:
    acc = SseUsageAccumulator(Api.OPENAI_CHAT)
    acc.feed(b'data: {"choices":[{"delta":{"reasoning_content":"think"}}]}\n\n')
    acc.feed(b'data: {"choices":[{"delta":{"refusal":"no"}}]}\n\n')
    acc.feed(b'data: {"choices":[{"delta":{"function_call":{"arguments":"{}"}}}]}\n\n')
    assert acc.output_chars == 9
    assert acc.usage is None


def test_responses_stream_counts_deltas_once() -> None:
    # output_text.done, content_part.done and output_item.done repeat the text: not counted.
    acc = SseUsageAccumulator(Api.OPENAI_RESPONSES)
    acc.feed(body("openai_responses_stream.sse"))
    assert acc.output_chars == len("Hi there! How can I assist you today? 😊")
    assert acc.usage == TokenUsage(37, 0, 12)


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete"])
def test_responses_usage_from_final_event(final: str) -> None:
    event = {
        "type": final,
        "response": {"usage": {"input_tokens": 50, "output_tokens": 9, "total_tokens": 59}},
    }
    acc = SseUsageAccumulator(Api.OPENAI_RESPONSES)
    acc.feed(b"event: " + final.encode() + b"\ndata: " + json.dumps(event).encode() + b"\n\n")
    assert acc.usage == TokenUsage(50, 0, 9)


def test_responses_usage_not_taken_from_other_events() -> None:
    event = {
        "type": "response.in_progress",
        "response": {"usage": {"input_tokens": 5, "output_tokens": 1}},
    }
    acc = SseUsageAccumulator(Api.OPENAI_RESPONSES)
    acc.feed(b"data: " + json.dumps(event).encode() + b"\n\n")
    assert acc.usage is None
