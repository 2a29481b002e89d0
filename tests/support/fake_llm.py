"""A fake LLM upstream that speaks OpenAI and Anthropic well enough for their real SDKs.

Endpoints (JSON, and SSE when the body says ``"stream": true``):

    POST /v1/chat/completions   chat.completion / chat.completion.chunk + [DONE]
    POST /v1/completions        text_completion (legacy) / chunks + [DONE]
    POST /v1/responses          response / response.* events ending in response.completed
    POST /v1/embeddings         list of embeddings (float or base64), never streamed
    POST /v1/messages           Anthropic message / message_start ... message_stop
    GET  /v1/models             a one-model list (a request without a body)

Usage is deterministic, steered per request by headers (the body is left as the client
sent it, so tests can check what Envoy/the service changed in it):

    x-fake-words: N                reply length in words (default 5); output tokens = words
    x-fake-prompt-tokens: N        input tokens, all included (default: FakeLLM(prompt_tokens=10));
                                   fixed, NOT derived from the prompt, so tests know it exactly
    x-fake-cached-tokens: N        part of the input read from cache (default 0)
    x-fake-cache-creation-tokens: N  part of the input written to cache (Anthropic only, default 0)
    x-fake-reasoning-tokens: N     hidden output tokens, added to output tokens (default 0)
    x-fake-service-tier: S         the service_tier the answer reports (Chat JSON, Anthropic)
    x-fake-status: CODE            answer CODE with the API's error body instead
    x-fake-delay-ms: N             wait before the response headers
    x-fake-chunk-delay-ms: N       wait after each streamed word (client-disconnect tests)
    x-fake-abort-after: N          upstream drops the connection after N streamed words
    x-fake-split-bytes: N          write the stream in N-byte pieces, a moment apart, so
                                   Envoy's chunks cut across SSE events (not one per event)
    x-fake-unterminated: 1         end the stream without the last event's blank line
    x-fake-content-length: 1       send the whole stream at once, with Content-Length
    x-fake-id: S, x-fake-created: N  the response id and timestamp (default: a counter and
                                   now), so two answers can be compared byte for byte
    x-fake-stall-after: N          pause after N streamed words until the client leaves (30 s
                                   at most): no word is in flight when it does
    x-fake-gzip: 1                 gzip the body (Content-Encoding) if the client accepts gzip
    x-fake-gzip: always            gzip it whatever the client accepts (the shipped Envoy asks
                                   for identity; an upstream may compress all the same)
    x-fake-gzip-bomb: N            a hostile upstream: a gzip body (whatever the client
                                   accepts) inflating to N MiB of zeros from about N KiB;
                                   SSE content type when the request streams. No usage.

A request's ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` caps the
output as a real model does (finish_reason ``length``, stop_reason ``max_tokens``).

Usage fields as each API reports them, for P prompt tokens (C cached, W cache-written):
OpenAI ``prompt_tokens = P`` with ``cached_tokens = C`` inside it; Anthropic
``input_tokens = P - C - W``, ``cache_read_input_tokens = C``,
``cache_creation_input_tokens = W``. A chat/completions stream reports usage only with
``stream_options.include_usage``, as OpenAI does.

Every request is recorded in ``records`` once its response is over (use
``wait_records`` before asserting: the client can see the last byte before the record
lands). An aborted stream has ``completed=False`` and ``output_tokens`` = tokens sent.
``in_flight`` counts the requests being answered right now (``wait_in_flight``): a test
that needs "these streams are open" waits for that, never for a fixed time. A stream
with ``x-fake-hold: NAME`` stops after its first word until ``release(NAME)``: a test
holds it open for as long as its condition needs, not for a guessed duration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.procs import BackgroundLoop, wait_until

__all__ = ["FakeLLM", "FakeLLMThread", "Record"]

# Reply words: one word = one output token = one streamed chunk.
_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)


@dataclass
class Record:
    """One request as the fake saw it, and the usage it reported for it."""

    path: str
    model: str | None
    stream: bool
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    status: int  # 499: the sender gave up before the request body was complete
    completed: bool  # False if the stream ended early (client left, or x-fake-abort-after)
    headers: dict[str, str]  # as received, lowercase names: shows what Envoy added upstream
    body: Any = None  # the parsed JSON request body as received
    include_usage: bool = False  # stream_options.include_usage as received
    usage_reported: bool = False  # the usage-carrying body/event reached the wire
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass
class _Turn:
    """Everything one answer needs, decided before the first byte."""

    api: str
    id: str
    model: str
    words: list[str]
    truncated: bool
    prompt: int
    cached: int
    cache_creation: int
    reasoning: int
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    service_tier: str = ""  # x-fake-service-tier: the tier the answer says served it

    @property
    def output(self) -> int:
        return len(self.words) + self.reasoning

    def pieces(self) -> Iterator[str]:
        for i, word in enumerate(self.words):
            yield word if i == 0 else " " + word

    @property
    def text(self) -> str:
        return " ".join(self.words)


class _BadDirective(ValueError):
    pass


def _int_header(request: web.Request, name: str, default: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadDirective(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise _BadDirective(f"{name} must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------- OpenAI


def _openai_usage(t: _Turn) -> dict[str, Any]:
    return {
        "prompt_tokens": t.prompt,
        "completion_tokens": t.output,
        "total_tokens": t.prompt + t.output,
        "prompt_tokens_details": {"cached_tokens": t.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": t.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_json(t: _Turn) -> dict[str, Any]:
    message = {"role": "assistant", "content": t.text, "refusal": None, "annotations": []}
    return {
        "id": t.id,
        "object": "chat.completion",
        "created": t.created,
        "model": t.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "length" if t.truncated else "stop",
            }
        ],
        "usage": _openai_usage(t),
        "service_tier": t.service_tier or "default",
        "system_fingerprint": "fp_fake",
    }


def _chat_events(t: _Turn) -> Iterator[tuple[str, bytes]]:
    """(kind, bytes) per SSE event; kind is 'word', 'usage' or 'other'."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": t.id,
            "object": "chat.completion.chunk",
            "created": t.created,
            "model": t.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if t.include_usage:  # OpenAI then sends "usage": null on every other chunk
            out["usage"] = None
        return out

    yield "other", _data(chunk({"role": "assistant", "content": "", "refusal": None}, None))
    for piece in t.pieces():
        yield "word", _data(chunk({"content": piece}, None))
    yield "other", _data(chunk({}, "length" if t.truncated else "stop"))
    if t.include_usage:
        last = chunk({}, None)
        last["choices"] = []
        last["usage"] = _openai_usage(t)
        yield "usage", _data(last)
    yield "other", b"data: [DONE]\n\n"


def _completion_json(t: _Turn) -> dict[str, Any]:
    choice = {
        "text": t.text,
        "index": 0,
        "logprobs": None,
        "finish_reason": "length" if t.truncated else "stop",
    }
    return {
        "id": t.id,
        "object": "text_completion",
        "created": t.created,
        "model": t.model,
        "choices": [choice],
        "usage": _openai_usage(t),
    }


def _completion_events(t: _Turn) -> Iterator[tuple[str, bytes]]:
    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        out: dict[str, Any] = {
            "id": t.id,
            "object": "text_completion",
            "created": t.created,
            "model": t.model,
            "choices": [choice],
        }
        if t.include_usage:
            out["usage"] = None
        return out

    for piece in t.pieces():
        yield "word", _data(chunk(piece, None))
    yield "other", _data(chunk("", "length" if t.truncated else "stop"))
    if t.include_usage:
        last = chunk("", None)
        last["choices"] = []
        last["usage"] = _openai_usage(t)
        yield "usage", _data(last)
    yield "other", b"data: [DONE]\n\n"


def _responses_message(t: _Turn, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "type": "message",
        "id": "msg_" + t.id,
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" else [],
    }


def _responses_json(t: _Turn, *, final: bool = True) -> dict[str, Any]:
    status = ("incomplete" if t.truncated else "completed") if final else "in_progress"
    return {
        "id": t.id,
        "object": "response",
        "created_at": t.created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if final and t.truncated else None,
        "instructions": None,
        "model": t.model,
        "output": [_responses_message(t, t.text, "completed")] if final else [],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "metadata": {},
        "usage": {
            "input_tokens": t.prompt,
            "input_tokens_details": {"cached_tokens": t.cached},
            "output_tokens": t.output,
            "output_tokens_details": {"reasoning_tokens": t.reasoning},
            "total_tokens": t.prompt + t.output,
        }
        if final
        else None,
    }


def _responses_events(t: _Turn) -> Iterator[tuple[str, bytes]]:
    seq = iter(range(1_000_000))
    item_id = "msg_" + t.id
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def ev(kind: str, **payload: Any) -> bytes:
        return _event(kind, {"type": kind, "sequence_number": next(seq), **payload})

    yield "other", ev("response.created", response=_responses_json(t, final=False))
    yield "other", ev("response.in_progress", response=_responses_json(t, final=False))
    item = _responses_message(t, "", "in_progress")
    yield "other", ev("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield "other", ev("response.content_part.added", **where, part=part)
    for piece in t.pieces():
        yield "word", ev("response.output_text.delta", **where, delta=piece, logprobs=[])
    yield "other", ev("response.output_text.done", **where, text=t.text, logprobs=[])
    yield "other", ev("response.content_part.done", **where, part={**part, "text": t.text})
    done = _responses_message(t, t.text, "completed")
    yield "other", ev("response.output_item.done", output_index=0, item=done)
    final = "response.incomplete" if t.truncated else "response.completed"
    yield "usage", ev(final, response=_responses_json(t))


def _embeddings_json(t: _Turn, body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not _is_int(inputs[0]) else 1
    dims = int(body.get("dimensions") or 8)
    vector = [round((i + 1) / dims, 4) for i in range(dims)]
    packed: Any = vector
    if body.get("encoding_format") == "base64":  # the openai SDK's default
        packed = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
    data = [{"object": "embedding", "index": i, "embedding": packed} for i in range(count)]
    usage = {"prompt_tokens": t.prompt, "total_tokens": t.prompt}
    return {"object": "list", "data": data, "model": t.model, "usage": usage}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------- Anthropic


def _anthropic_usage(t: _Turn, output: int) -> dict[str, Any]:
    return {
        "input_tokens": max(0, t.prompt - t.cached - t.cache_creation),
        "cache_creation_input_tokens": t.cache_creation,
        "cache_read_input_tokens": t.cached,
        "output_tokens": output,
        "service_tier": t.service_tier or "standard",
    }


def _message_json(t: _Turn, *, final: bool = True) -> dict[str, Any]:
    return {
        "id": t.id,
        "type": "message",
        "role": "assistant",
        "model": t.model,
        "content": [{"type": "text", "text": t.text}] if final else [],
        "stop_reason": ("max_tokens" if t.truncated else "end_turn") if final else None,
        "stop_sequence": None,
        # Like the real API, message_start already counts a first output token.
        "usage": _anthropic_usage(t, t.output if final else min(1, t.output)),
    }


def _message_events(t: _Turn) -> Iterator[tuple[str, bytes]]:
    start = {"type": "message_start", "message": _message_json(t, final=False)}
    yield "other", _event("message_start", start)
    block = {"type": "text", "text": ""}
    yield (
        "other",
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
    )
    yield "other", _event("ping", {"type": "ping"})
    for piece in t.pieces():
        delta = {"type": "text_delta", "text": piece}
        yield (
            "word",
            _event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            ),
        )
    yield "other", _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    stop = "max_tokens" if t.truncated else "end_turn"
    yield (
        "usage",
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": t.output},  # cumulative, the final count
            },
        ),
    )
    yield "other", _event("message_stop", {"type": "message_stop"})


# ------------------------------------------------------------------------------ wire


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _event(kind: str, obj: Any) -> bytes:
    return f"event: {kind}\n".encode() + _data(obj)


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(
        status, "invalid_request_error" if status < 500 else "api_error"
    )
    return {"type": "error", "error": {"type": kind, "message": message}}


# (api, id prefix, max-output field names) per route
_ROUTES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "/v1/chat/completions": ("chat", "chatcmpl-", ("max_completion_tokens", "max_tokens")),
    "/v1/completions": ("completions", "cmpl-", ("max_tokens",)),
    "/v1/responses": ("responses", "resp_", ("max_output_tokens",)),
    "/v1/embeddings": ("embeddings", "emb-", ()),
    "/v1/messages": ("messages", "msg_", ("max_tokens",)),
}


class FakeLLM:
    """The fake upstream on an asyncio loop. ``run_in_thread()`` for sync tests."""

    def __init__(self, *, prompt_tokens: int = 10, words: int = 5, host: str = "127.0.0.1"):
        self.default_prompt_tokens = prompt_tokens
        self.default_words = words
        self.host = host
        self.records: list[Record] = []
        self.in_flight = 0  # requests arrived whose answer is not over yet
        self._holds: dict[str, asyncio.Event] = {}  # x-fake-hold name -> its release
        self._counter = 0
        # reset() starts a new generation: a request that arrived before it (a stream the
        # last test left open) is never recorded after it, in the next test's records.
        self._generation = 0
        self._runner: web.AppRunner | None = None
        self._port = 0

    # lifecycle ---------------------------------------------------------------------
    async def start(self, port: int = 0) -> None:
        app = web.Application(  # big prompts are a test case
            client_max_size=64 * 1024 * 1024, middlewares=[self._count_in_flight]
        )
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/{tail:.*}", self._handle)
        # A short shutdown_timeout: stop() must not wait a minute for a slowed stream.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def reset(self) -> None:
        self._generation += 1
        self.records.clear()
        for held in self._holds.values():
            held.set()  # nothing stays held into the next test
        self._holds.clear()

    def release(self, name: str) -> None:
        """Let the streams sent with ``x-fake-hold: name`` (now or later) go on."""
        self._hold(name).set()

    def _hold(self, name: str) -> asyncio.Event:
        return self._holds.setdefault(name, asyncio.Event())

    # Same signature as FakeLLMThread.wait_records, hence a timeout parameter.
    async def wait_records(self, count: int, timeout: float = 5.0) -> list[Record]:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while len(self.records) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake LLM has {len(self.records)} records, wanted {count}")
            await asyncio.sleep(0.01)
        return list(self.records)

    @classmethod
    def run_in_thread(cls, port: int = 0, **kwargs: Any) -> FakeLLMThread:
        return FakeLLMThread(cls(**kwargs), port)

    # handlers ----------------------------------------------------------------------
    @web.middleware
    async def _count_in_flight(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.in_flight += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self.in_flight -= 1

    def _record(self, generation: int, record: Record) -> None:
        if generation == self._generation:
            self.records.append(record)

    async def _models(self, request: web.Request) -> web.Response:
        self._record(
            self._generation,
            Record(request.path, None, False, 0, 0, 0, 200, True, _headers(request), None),
        )
        model = {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        generation = self._generation
        headers = _headers(request)
        route = _ROUTES.get(request.path)
        error_body = _anthropic_error if request.path == "/v1/messages" else _openai_error
        try:
            raw = await request.read()
        except ConnectionResetError:
            # The sender gave up mid-body (e.g. Envoy answering 413 after it began
            # forwarding): record it like nginx's 499, without a server error log.
            self._record(
                generation, Record(request.path, None, False, 0, 0, 0, 499, False, headers, None)
            )
            return web.Response(status=499)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        record = Record(
            path=request.path,
            model=body.get("model") if isinstance(body, dict) else None,
            stream=bool(isinstance(body, dict) and body.get("stream")),
            prompt_tokens=0,
            cached_tokens=0,
            output_tokens=0,
            status=200,
            completed=False,
            headers=headers,
            body=body,
        )
        try:
            if route is None:
                return self._error(record, 404, f"no route {request.path}", error_body)
            if not isinstance(body, dict):
                return self._error(record, 400, "body is not a JSON object", error_body)
            try:
                turn = self._turn(request, body, route)
                status = _int_header(request, "x-fake-status", 200)
                delay = _int_header(request, "x-fake-delay-ms", 0)
                chunk_delay = _int_header(request, "x-fake-chunk-delay-ms", 0) / 1000
                abort_after = (
                    _int_header(request, "x-fake-abort-after", 0)
                    if "x-fake-abort-after" in request.headers
                    else None
                )
            except _BadDirective as exc:
                return self._error(record, 400, str(exc), error_body)
            if delay:
                await asyncio.sleep(delay / 1000)
            if status != 200:
                return self._error(record, status, f"fake upstream error ({status})", error_body)
            record.prompt_tokens = turn.prompt
            record.cached_tokens = turn.cached
            record.cache_creation_tokens = turn.cache_creation
            record.reasoning_tokens = turn.reasoning
            record.include_usage = turn.include_usage
            bomb = _int_header(request, "x-fake-gzip-bomb", 0)
            if bomb:
                record.completed = True
                kind = "text/event-stream" if record.stream else "application/json"
                headers = {"Content-Type": kind, "Content-Encoding": "gzip"}
                return web.Response(body=_gzip_bomb(bomb), headers=headers)
            gzip_it = request.headers.get("x-fake-gzip") == "always" or (
                request.headers.get("x-fake-gzip") == "1"
                and "gzip" in request.headers.get("accept-encoding", "")
            )
            if record.stream and turn.api != "embeddings":
                split = _int_header(request, "x-fake-split-bytes", 0)
                return await self._stream(
                    request, record, turn, chunk_delay, abort_after, gzip_it, split
                )
            payload = {
                "chat": _chat_json,
                "completions": _completion_json,
                "responses": _responses_json,
                "messages": _message_json,
            }.get(turn.api)
            doc = payload(turn) if payload else _embeddings_json(turn, body)
            record.output_tokens = turn.output if turn.api != "embeddings" else 0
            record.stream = False
            record.usage_reported = record.completed = True
            data = json.dumps(doc).encode()
            extra = {}
            if gzip_it:
                data, extra = gzip.compress(data), {"Content-Encoding": "gzip"}
            return web.Response(body=data, content_type="application/json", headers=extra)
        finally:
            self._record(generation, record)

    def _turn(
        self, request: web.Request, body: dict[str, Any], route: tuple[str, str, tuple[str, ...]]
    ) -> _Turn:
        api, prefix, cap_fields = route
        words = _int_header(request, "x-fake-words", self.default_words)
        reasoning = _int_header(request, "x-fake-reasoning-tokens", 0)
        cap = next((body[f] for f in cap_fields if _is_int(body.get(f))), None)
        truncated = False
        if cap is not None:
            reasoning = min(reasoning, cap)
            if words > cap - reasoning:
                words, truncated = cap - reasoning, True
        self._counter += 1
        options = body.get("stream_options")
        return _Turn(
            api=api,
            id=request.headers.get("x-fake-id", f"{prefix}fake{self._counter:06d}"),
            created=_int_header(request, "x-fake-created", int(time.time())),
            model=str(body.get("model", "fake-model")),
            words=[_WORDS[i % len(_WORDS)] for i in range(words)],
            truncated=truncated,
            prompt=_int_header(request, "x-fake-prompt-tokens", self.default_prompt_tokens),
            cached=_int_header(request, "x-fake-cached-tokens", 0),
            cache_creation=_int_header(request, "x-fake-cache-creation-tokens", 0),
            reasoning=reasoning,
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
            service_tier=request.headers.get("x-fake-service-tier", ""),
        )

    def _error(self, record: Record, status: int, message: str, builder: Any) -> web.Response:
        record.status = status
        record.completed = True
        return web.json_response(builder(status, message), status=status)

    async def _stream(
        self,
        request: web.Request,
        record: Record,
        turn: _Turn,
        chunk_delay: float,
        abort_after: int | None,
        gzip_it: bool,
        split: int = 0,
    ) -> web.StreamResponse:
        events = {
            "chat": _chat_events,
            "completions": _completion_events,
            "responses": _responses_events,
            "messages": _message_events,
        }[turn.api](turn)
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        if request.headers.get("x-fake-content-length") == "1":
            whole = list(events)
            record.output_tokens = turn.output
            record.usage_reported = any(kind == "usage" for kind, _ in whole)
            record.completed = True
            return web.Response(body=b"".join(chunk for _, chunk in whole), headers=headers)
        # Flush after every event so each one leaves at once, as a real provider's does.
        packer = zlib.compressobj(wbits=31) if gzip_it else None
        if packer:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        sent = 0
        stall_after = int(request.headers.get("x-fake-stall-after", "0"))
        record.output_tokens = turn.reasoning  # thought before the first word
        held = b""  # with split: what has not made a whole piece yet
        if request.headers.get("x-fake-unterminated") == "1":
            *head, (kind, last) = events
            events = iter([*head, (kind, last.rstrip(b"\n"))])
        hold = self._hold(request.headers["x-fake-hold"]) if "x-fake-hold" in request.headers else None
        try:
            for kind, chunk in events:
                if kind == "word" and abort_after is not None and sent >= abort_after:
                    assert request.transport is not None
                    request.transport.abort()  # an upstream that dies mid-answer
                    return response
                if packer:
                    chunk = packer.compress(chunk) + packer.flush(zlib.Z_SYNC_FLUSH)
                if split:
                    held += chunk
                    while len(held) >= split:
                        await response.write(held[:split])
                        held = held[split:]
                        await asyncio.sleep(0.002)  # a separate read for Envoy
                else:
                    await response.write(chunk)
                if kind == "word":
                    sent += 1
                    record.output_tokens = turn.reasoning + sent
                    if hold is not None:
                        await hold.wait()
                        hold = None
                    if chunk_delay:
                        await asyncio.sleep(chunk_delay)
                    if sent == stall_after:
                        await _stall(request)
                elif kind == "usage":
                    record.usage_reported = True
            if held:
                await response.write(held)
            if packer:
                await response.write(packer.flush())
            record.completed = True
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away: completed stays False
        return response


async def _stall(request: web.Request, limit_s: float = 30.0) -> None:
    """Pause until the client is gone (or ``limit_s``): nothing is in flight when it leaves."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        transport = request.transport  # None once the connection is lost
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.02)


_BOMBS: dict[int, bytes] = {}


def _gzip_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros, gzipped once per size (about 1000:1)."""
    if mib not in _BOMBS:
        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = bytes(1024 * 1024)
        _BOMBS[mib] = b"".join(z.compress(block) for _ in range(mib)) + z.flush()
    return _BOMBS[mib]


def _headers(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


class FakeLLMThread:
    """A FakeLLM serving from its own loop thread, for sync tests and sync fixtures."""

    def __init__(self, fake: FakeLLM, port: int = 0) -> None:
        self.fake = fake
        self._loop = BackgroundLoop("fake-llm")
        try:
            self._loop.run(fake.start(port))
        except BaseException:
            self._loop.close()
            raise

    @property
    def port(self) -> int:
        return self.fake.port

    @property
    def url(self) -> str:
        return self.fake.url

    @property
    def records(self) -> list[Record]:
        return self.fake.records

    def reset(self) -> None:
        async def on_loop() -> None:  # held streams' events belong to the server's loop
            self.fake.reset()

        self._loop.run(on_loop())

    def wait_records(self, count: int, timeout: float = 5.0) -> list[Record]:
        try:
            wait_until(lambda: len(self.fake.records) >= count, timeout=timeout, what="records")
        except TimeoutError:
            have = len(self.fake.records)
            raise TimeoutError(
                f"fake LLM has {have} records after {timeout}s, wanted {count}"
            ) from None
        return list(self.fake.records)

    def release(self, name: str) -> None:
        """``FakeLLM.release`` on the server's loop."""
        self._loop.loop.call_soon_threadsafe(self.fake.release, name)

    def wait_in_flight(self, count: int, timeout: float = 20.0) -> None:
        """Until ``count`` requests are being answered at once (e.g. streams held open)."""
        wait_until(
            lambda: self.fake.in_flight >= count,
            timeout=timeout,
            what=f"{count} requests in flight at the fake LLM (now {self.fake.in_flight})",
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self.fake.stop())
        self._loop.close()

    def __enter__(self) -> FakeLLMThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """``python -m tests.support.fake_llm --port 8080``: the README's stand-in upstream."""
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI/Anthropic upstream")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    async def run() -> None:
        fake = FakeLLM(host=args.host)
        await fake.start(args.port)
        print(f"fake LLM on {fake.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
