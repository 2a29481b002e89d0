"""Request estimates for every API shape, body errors, the include_usage rewrite, routing."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from authz.apis import Api, api_for_path, streams_sse
from authz.errors import BodyError
from authz.estimate import (
    RequestEstimate,
    estimate_request,
    tokens_for_chars,
    tokens_for_text,
)
from authz.mutate.request import with_include_usage

pytestmark = pytest.mark.unit


def estimate(api: Api, obj: object) -> RequestEstimate:
    return estimate_request(api, json.dumps(obj).encode())


def compact_len(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")))


@pytest.mark.parametrize(("n", "tokens"), [(0, 0), (-3, 0), (1, 1), (4, 1), (5, 2), (400, 100)])
def test_tokens_for_chars(n: int, tokens: int) -> None:
    assert tokens_for_chars(n) == tokens


def test_tokens_for_text_counts_characters_not_bytes() -> None:
    assert tokens_for_text("") == 0
    assert tokens_for_text("a") == 1
    assert tokens_for_text("héllo") == 2
    assert tokens_for_text("日本語") == 1


def test_chat() -> None:
    est = estimate(
        Api.OPENAI_CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            "max_tokens": 100,
        },
    )
    # 14 + 30 characters -> 11 tokens, plus 4 per message.
    assert est == RequestEstimate(Api.OPENAI_CHAT, "gpt-4o", 19, 100, False, False)


def test_chat_parts_with_image() -> None:
    content = [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {"url": "https://example.com/c.png", "detail": "low"}},
    ]
    est = estimate(Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": content}]})
    assert est.input_tokens == 5 + 85 + 4
    assert est.model is None
    assert est.max_output_tokens is None


def test_chat_tool_calls_and_tools() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": call}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C and sunny"},
    ]
    est = estimate(Api.OPENAI_CHAT, {"messages": messages, "tools": tools})
    chars = 17 + 11 + 16 + 13 + compact_len(tools)
    assert est.input_tokens == tokens_for_chars(chars) + 3 * 4


def test_chat_limits_stream_and_include_usage() -> None:
    base: dict[str, Any] = {"messages": [], "stream": True}
    assert estimate(Api.OPENAI_CHAT, base).include_usage is False
    est = estimate(
        Api.OPENAI_CHAT,
        base | {"stream_options": {"include_usage": True}, "max_completion_tokens": 50},
    )
    assert (est.stream, est.include_usage, est.max_output_tokens) == (True, True, 50)
    # Both limits present: an upstream may obey either, so the larger is reserved.
    both = {"max_completion_tokens": 50, "max_tokens": 100}
    assert estimate(Api.OPENAI_CHAT, base | both).max_output_tokens == 100
    # n choices each generate up to the limit.
    assert estimate(Api.OPENAI_CHAT, base | {"max_tokens": 100, "n": 3}).max_output_tokens == 300


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("Say this is a test", 5),
        (["abc", "defgh"], 2),
        ([1, 2, 3], 3),
        ([[101, 2023], [3]], 3),
        (None, 0),
    ],
)
def test_completions_prompt(prompt: object, tokens: int) -> None:
    est = estimate(Api.OPENAI_COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": prompt})
    assert est.input_tokens == tokens
    assert est.max_output_tokens is None


def test_completions_best_of_multiplies_the_limit() -> None:
    body = {"prompt": "x", "max_tokens": 10, "n": 2, "best_of": 3}
    assert estimate(Api.OPENAI_COMPLETIONS, body).max_output_tokens == 30


def test_responses_string_input() -> None:
    body = {"instructions": "Be brief.", "input": "Tell me a joke.", "max_output_tokens": 256}
    est = estimate(Api.OPENAI_RESPONSES, body)
    assert (est.input_tokens, est.max_output_tokens, est.include_usage) == (6, 256, False)


def test_responses_items() -> None:
    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this image?"},
                {"type": "input_image", "image_url": "https://example.com/c.png"},
            ],
        },
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "item_reference", "id": "msg_123"},
    ]
    est = estimate(Api.OPENAI_RESPONSES, {"input": items})
    assert est.input_tokens == tokens_for_chars(22 + 6 + 2 + 2) + 85 + 4 * 4


def test_embeddings() -> None:
    body = {"model": "text-embedding-3-small", "input": ["The food was delicious", "and so."]}
    est = estimate(Api.OPENAI_EMBEDDINGS, body)
    assert (est.input_tokens, est.max_output_tokens) == (tokens_for_chars(22 + 7), 0)
    assert estimate(Api.OPENAI_EMBEDDINGS, {"input": [[101, 2023], [3]]}).input_tokens == 3


def test_anthropic_simple() -> None:
    body = {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 1024,
        "system": "You are a pirate.",
        "messages": [{"role": "user", "content": "Hello"}],
    }
    est = estimate(Api.ANTHROPIC_MESSAGES, body)
    assert est == RequestEstimate(
        Api.ANTHROPIC_MESSAGES, "claude-sonnet-4-20250514", 6 + 4, 1024, False, False
    )


def test_anthropic_blocks() -> None:
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    body = {
        "max_tokens": 512,
        "stream": True,
        "system": [{"type": "text", "text": "Be concise.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": image},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "cat"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "A cat."}],
                    }
                ],
            },
        ],
    }
    est = estimate(Api.ANTHROPIC_MESSAGES, body)
    chars = 11 + 13 + 6 + len('{"q":"cat"}') + 6
    assert est.input_tokens == tokens_for_chars(chars) + 1600 + 3 * 4
    assert (est.stream, est.include_usage) == (True, False)


@pytest.mark.parametrize(
    ("api", "raw", "message"),
    [
        (Api.OPENAI_CHAT, b"", "request body is empty"),
        (Api.OPENAI_CHAT, b" \n", "request body is empty"),
        (Api.OPENAI_CHAT, b"not json", "request body is not JSON"),
        (Api.OPENAI_CHAT, b'{"model": gpt}', "request body is not JSON"),
        (Api.OPENAI_CHAT, b'{"model": "gpt-4o", "messages": [', "truncated JSON"),
        (Api.OPENAI_CHAT, b'{"model": "gpt-4o"', "truncated JSON"),
        (Api.OPENAI_CHAT, b"\xff\xfe{}", "not UTF-8"),
        (Api.OPENAI_CHAT, b"[1]", "must be a JSON object, got array"),
        (Api.OPENAI_CHAT, b'"hi"', "must be a JSON object, got string"),
        (Api.OPENAI_CHAT, b"{}", "messages is missing"),
        (Api.OPENAI_CHAT, b'{"messages": "hi"}', "messages must be a list of message objects"),
        (Api.OPENAI_CHAT, b'{"messages": ["hi"]}', "messages[0] must be an object, got string"),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [{"role": "user", "content": 5}]}',
            "messages[0].content must be a string or a list of parts, got number 5",
        ),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [{"role": "user", "content": ["hi"]}]}',
            "messages[0].content[0] must be an object, got string",
        ),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [], "max_tokens": -1}',
            "max_tokens must be a non-negative integer, got number -1",
        ),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [], "max_tokens": "100"}',
            "max_tokens must be a non-negative integer, got string",
        ),
        (Api.OPENAI_CHAT, b'{"messages": [], "max_tokens": 1.5}', "got number 1.5"),
        (Api.OPENAI_CHAT, b'{"messages": [], "max_tokens": true}', "got boolean"),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [], "max_completion_tokens": -5}',
            "max_completion_tokens must be",
        ),
        (Api.OPENAI_CHAT, b'{"messages": [], "n": -1}', "n must be a non-negative integer"),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [], "stream": "yes"}',
            "stream must be a boolean, got string",
        ),
        (Api.OPENAI_CHAT, b'{"messages": [], "model": 5}', "model must be a string, got number 5"),
        (Api.OPENAI_CHAT, b'{"messages": [], "tools": {}}', "tools must be a list, got object"),
        (
            Api.OPENAI_CHAT,
            b'{"messages": [], "stream_options": "x"}',
            "stream_options must be an object",
        ),
        (
            Api.OPENAI_COMPLETIONS,
            b'{"prompt": {"a": 1}}',
            "prompt must be a string, a list of strings or token ids",
        ),
        (Api.OPENAI_COMPLETIONS, b'{"prompt": [1, -2]}', "prompt must be"),
        (Api.OPENAI_EMBEDDINGS, b'{"model": "text-embedding-3-small"}', "input is missing"),
        (
            Api.OPENAI_EMBEDDINGS,
            b'{"input": [1.5]}',
            "input must be a string, a list of strings or token ids, got number 1.5",
        ),
        (Api.OPENAI_RESPONSES, b'{"input": 5}', "input must be a string or a list of items"),
        (Api.OPENAI_RESPONSES, b'{"input": ["hi"]}', "input[0] must be an object"),
        (
            Api.OPENAI_RESPONSES,
            b'{"input": "hi", "instructions": 5}',
            "instructions must be a string",
        ),
        (
            Api.OPENAI_RESPONSES,
            b'{"input": "hi", "max_output_tokens": -1}',
            "max_output_tokens must be",
        ),
        (Api.ANTHROPIC_MESSAGES, b'{"max_tokens": 10}', "messages is missing"),
        (
            Api.ANTHROPIC_MESSAGES,
            b'{"messages": [], "system": 5}',
            "system must be a string or a list of parts",
        ),
        (
            Api.ANTHROPIC_MESSAGES,
            b'{"messages": [], "max_tokens": "1024"}',
            "max_tokens must be a non-negative integer",
        ),
    ],
)
def test_bad_bodies_name_what_is_wrong(api: Api, raw: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=re.escape(message)):
        estimate_request(api, raw)


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_body_is_a_body_error(depth: int) -> None:
    nested = b'[{"type":"tool_result","content":' * depth + b'"x"' + b"}]" * depth
    raw = b'{"messages":[{"role":"user","content":' + nested + b"}]}"
    with pytest.raises(BodyError, match="nested too deeply"):
        estimate_request(Api.ANTHROPIC_MESSAGES, raw)


def test_with_include_usage_round_trip() -> None:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "café"}]}
    raw = json.dumps(body).encode()
    assert estimate_request(Api.OPENAI_CHAT, raw).include_usage is False
    rewritten = with_include_usage(raw)
    assert rewritten is not None
    assert json.loads(rewritten) == body | {"stream_options": {"include_usage": True}}
    assert "café".encode() in rewritten  # stays UTF-8, not \\u escapes
    assert estimate_request(Api.OPENAI_CHAT, rewritten).include_usage is True
    assert with_include_usage(rewritten) is None  # already on: no change


def test_with_include_usage_keeps_other_stream_options() -> None:
    options = {"include_usage": False, "include_obfuscation": False}
    raw = json.dumps({"stream": True, "stream_options": options}).encode()
    rewritten = with_include_usage(raw)
    assert rewritten is not None
    assert json.loads(rewritten)["stream_options"] == {
        "include_usage": True,
        "include_obfuscation": False,
    }


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": []}',
        b'{"stream": false}',
        b'{"stream": "true"}',
        b'{"stream": true, "stream_options": "on"}',
        b"[1]",
        b"not json",
        b"",
    ],
)
def test_with_include_usage_leaves_other_bodies_alone(raw: bytes) -> None:
    assert with_include_usage(raw) is None


def test_with_include_usage_survives_a_lone_surrogate() -> None:
    raw = b'{"stream": true, "messages": [{"role": "user", "content": "\\ud800x"}]}'
    rewritten = with_include_usage(raw)
    assert rewritten is not None
    assert json.loads(rewritten)["messages"][0]["content"] == "\ud800x"


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", Api.OPENAI_CHAT),
        ("/openai/v1/chat/completions?api-version=2024", Api.OPENAI_CHAT),
        ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", Api.OPENAI_CHAT),
        ("/v1/chat/completions/", Api.OPENAI_CHAT),
        ("/v1/completions", Api.OPENAI_COMPLETIONS),
        ("/v1/responses", Api.OPENAI_RESPONSES),
        ("/v1/embeddings", Api.OPENAI_EMBEDDINGS),
        ("/v1/messages", Api.ANTHROPIC_MESSAGES),
        ("/anthropic/v1/messages?beta=true", Api.ANTHROPIC_MESSAGES),
        ("/v1/models", None),
        ("/v1/messages/count_tokens", None),
        ("/v1/messages/batches", None),
        ("/v1/responses/resp_123", None),
        ("/v1/threads/thread_1/messages", None),
        ("/v1/chat/completions/chatcmpl-1/messages", None),
        ("/healthz?x=/v1/messages", None),
        ("/", None),
        ("", None),
    ],
)
def test_api_for_path(path: str, api: Api | None) -> None:
    assert api_for_path(path) is api


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/event-stream", True),
        ("text/event-stream; charset=utf-8", True),
        ("Text/Event-Stream", True),
        ("application/json", False),
        ("text/event-streaming", False),
        ("", False),
    ],
)
def test_streams_sse(content_type: str, expected: bool) -> None:
    assert streams_sse(content_type) is expected
