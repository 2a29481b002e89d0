"""Request body -> token estimate: what a call may cost, before the model says.

It only decides admission (how much to reserve) and the charge for a stream the client
abandoned; finished calls settle from the provider's usage. So it is cheap and offline, not
exact: no tokenizer (tiktoken downloads its encodings at run time; there is no network).

Heuristic, in tokens:
- text: ``ceil(characters / 4)`` (:data:`CHARS_PER_TOKEN`), the usual figure for English
  with GPT and Claude tokenizers. It undercounts scripts such as CJK (about one token per
  character); that error is bounded by one request, since settlement uses real usage.
- each message or input item: :data:`PER_MESSAGE_TOKENS` for its role and delimiters.
- each image, audio or file part: a fixed count, since its real cost depends on pixels
  or pages this service does not decode. OpenAI: 85, the documented cost of a
  low-detail image. Anthropic: 1600, its documented cost of an image at the largest size
  it keeps without downscaling (~1.15 megapixels).
- tools: the characters of their compact JSON, at the text rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from authz.apis import Api
from authz.errors import BodyError

__all__ = [
    "CHARS_PER_TOKEN",
    "PER_MESSAGE_TOKENS",
    "RequestEstimate",
    "estimate_request",
    "tokens_for_chars",
    "tokens_for_text",
]

CHARS_PER_TOKEN = 4
PER_MESSAGE_TOKENS = 4
OPENAI_MEDIA_TOKENS = 85
ANTHROPIC_MEDIA_TOKENS = 1600

# Output limits, whichever API documents which: an OpenAI-compatible upstream may take
# any of them (Chat takes max_tokens and its newer max_completion_tokens), so the
# largest one present is reserved.
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Part keys whose string value is text the model reads.
_TEXT_KEYS = ("text", "refusal", "thinking", "name", "arguments")
# Part keys that nest more parts (tool results, Responses messages and tool outputs).
_NESTED_KEYS = ("content", "output", "summary")
# Parts charged a fixed cost: their real cost depends on pixels, seconds or pages.
_MEDIA_TYPES = frozenset(
    {"image_url", "input_image", "image", "input_audio", "file", "input_file", "document"}
)


def tokens_for_chars(n: int) -> int:
    """Tokens for ``n`` characters of text: ``ceil(n / 4)``, 0 for none."""
    return -(-n // CHARS_PER_TOKEN) if n > 0 else 0


def tokens_for_text(text: str) -> int:
    """Tokens for ``text`` by the same rule: at least 1 for any non-empty text."""
    return tokens_for_chars(len(text))


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What a request may spend. ``max_output_tokens`` is the most output it can bill:
    the body's limit times ``n`` (OpenAI choices), None when the body sets no limit."""

    api: Api
    model: str | None
    input_tokens: int
    max_output_tokens: int | None
    stream: bool
    include_usage: bool
    choices: int = 1  # OpenAI ``n`` / ``best_of``: a capped limit is per choice


def _kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return f"number {value!r}"
    names = {str: "string", list: "array", dict: "object"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


class _Tally:
    """Characters and fixed-cost tokens of a prompt; rounded once, at the end."""

    __slots__ = ("chars", "media_tokens", "tokens")

    def __init__(self, media_tokens: int) -> None:
        self.chars = 0
        self.tokens = 0
        self.media_tokens = media_tokens

    def total(self) -> int:
        return tokens_for_chars(self.chars) + self.tokens

    def json(self, value: object) -> None:
        if value is not None:
            self.chars += len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))

    def content(self, value: object, where: str) -> None:
        """A string, or a list of parts; None counts nothing."""
        if isinstance(value, str):
            self.chars += len(value)
        elif isinstance(value, list):
            for i, part in enumerate(value):
                self.part(part, f"{where}[{i}]")
        elif value is not None:
            raise BodyError(f"{where} must be a string or a list of parts, got {_kind(value)}")

    def part(self, part: object, where: str) -> None:
        """One content part, Anthropic block or Responses input item."""
        if not isinstance(part, dict):
            raise BodyError(f"{where} must be an object, got {_kind(part)}")
        if part.get("type") in _MEDIA_TYPES:
            self.tokens += self.media_tokens
            return
        for key in _TEXT_KEYS:
            if isinstance(text := part.get(key), str):
                self.chars += len(text)
        if isinstance(part.get("input"), dict):  # Anthropic tool_use arguments
            self.json(part["input"])
        for key in _NESTED_KEYS:
            if isinstance(nested := part.get(key), str | list):
                self.content(nested, f"{where}.{key}")

    def messages(self, value: object, where: str) -> None:
        """A list of chat messages: role, content and (OpenAI) tool calls."""
        if value is None:
            raise BodyError(f"{where} is missing")
        if not isinstance(value, list):
            raise BodyError(f"{where} must be a list of message objects, got {_kind(value)}")
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise BodyError(f"{where}[{i}] must be an object, got {_kind(message)}")
            self.tokens += PER_MESSAGE_TOKENS
            self.content(message.get("content"), f"{where}[{i}].content")
            if isinstance(name := message.get("name"), str):
                self.chars += len(name)
            # An assistant turn that called tools has null content; the calls are its text.
            functions: list[object] = [message.get("function_call")]  # deprecated form
            if isinstance(calls := message.get("tool_calls"), list):
                functions += [c.get("function") for c in calls if isinstance(c, dict)]
            for function in functions:
                if isinstance(function, dict):
                    self.part(function, f"{where}[{i}].tool_calls[]")

    def items(self, value: object, where: str) -> None:
        """Responses API ``input``: a string, or a list of messages and typed items."""
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.tokens += PER_MESSAGE_TOKENS
                self.part(item, f"{where}[{i}]")
        elif isinstance(value, str):
            self.chars += len(value)
        elif value is not None:
            raise BodyError(f"{where} must be a string or a list of items, got {_kind(value)}")

    def prompt(self, value: object, where: str) -> None:
        """Completions ``prompt`` / Embeddings ``input``: text or token ids, one or many."""
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str):
                self.chars += len(v)
            elif _is_count(v):
                self.tokens += 1  # a token id is exactly one token
            elif isinstance(v, list) and all(_is_count(t) for t in v):
                self.tokens += len(v)
            else:
                raise BodyError(
                    f"{where} must be a string, a list of strings or token ids, got {_kind(v)}"
                )

    def tools(self, value: object) -> None:
        if value is not None and not isinstance(value, list):
            raise BodyError(f"tools must be a list, got {_kind(value)}")
        self.json(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object hook refusing duplicate keys: we would read the last, an upstream may
    read the first, and the difference is what the reservation understates."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyError(f"request body has a duplicate key {key!r}")
            seen.add(key)
    return obj


def _load(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise BodyError("request body is empty")
    try:
        # Decode first: json.loads(bytes) guesses UTF-16/32; these APIs only speak UTF-8.
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_unique)
    except UnicodeDecodeError as exc:
        raise BodyError("request body is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        # An error at the very end means the JSON stopped early: name it, since a body
        # cut by a proxy's buffer limit is the usual cause and the fix differs.
        if exc.pos >= len(exc.doc.rstrip()):
            raise BodyError("request body is truncated JSON") from exc
        raise BodyError(f"request body is not JSON: {exc.msg} at offset {exc.pos}") from exc
    except RecursionError as exc:
        raise BodyError("request body JSON is nested too deeply") from exc
    if not isinstance(obj, dict):
        raise BodyError(f"request body must be a JSON object, got {_kind(obj)}")
    return obj


def _optional(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = obj.get(key)
    # JSON null means "not set" in every one of these APIs.
    if value is not None and not isinstance(value, kind):
        raise BodyError(f"{key} must be {what}, got {_kind(value)}")
    return value


def _limit(obj: dict[str, Any], *keys: str) -> int | None:
    """The largest of ``keys`` set in ``obj``, each checked to be a non-negative integer.

    The largest, not the first: when a body names two limits, which one an upstream
    obeys is its own choice, so the reservation covers the larger."""
    found: int | None = None
    for key in keys:
        value = obj.get(key)
        if value is not None and not _is_count(value):
            raise BodyError(f"{key} must be a non-negative integer, got {_kind(value)}")
        if value is not None and (found is None or value > found):
            found = value
    return found


def estimate_request(api: Api, body: bytes) -> RequestEstimate:
    """Estimate a request's input and bound its output; BodyError if it is not one."""
    obj = _load(body)
    model = _optional(obj, "model", str, "a string")
    stream = bool(_optional(obj, "stream", bool, "a boolean"))
    tally = _Tally(ANTHROPIC_MEDIA_TOKENS if api is Api.ANTHROPIC_MESSAGES else OPENAI_MEDIA_TOKENS)
    include_usage, choices = False, 1
    try:
        if api is Api.OPENAI_EMBEDDINGS:
            if "input" not in obj:
                raise BodyError("input is missing")
            tally.prompt(obj["input"], "input")
            limit: int | None = 0
        elif api is Api.OPENAI_RESPONSES:
            tally.items(obj.get("input"), "input")
            tally.content(_optional(obj, "instructions", str, "a string"), "instructions")
            tally.tools(obj.get("tools"))
            limit = _limit(obj, *_OUTPUT_LIMITS)
        elif api is Api.ANTHROPIC_MESSAGES:
            tally.messages(obj.get("messages"), "messages")
            tally.content(obj.get("system"), "system")
            tally.tools(obj.get("tools"))
            limit = _limit(obj, *_OUTPUT_LIMITS)
        else:
            if api is Api.OPENAI_CHAT:
                tally.messages(obj.get("messages"), "messages")
                tally.tools(obj.get("tools"))
                tally.tools(obj.get("functions"))
                limit = _limit(obj, *_OUTPUT_LIMITS)
            else:
                if obj.get("prompt") is not None:
                    tally.prompt(obj["prompt"], "prompt")
                limit = _limit(obj, *_OUTPUT_LIMITS)
            # ``n`` choices (and legacy ``best_of``) each generate up to the limit.
            choices = max(_limit(obj, "n") or 1, _limit(obj, "best_of") or 1)
            options = _optional(obj, "stream_options", dict, "an object") or {}
            include_usage = options.get("include_usage") is True
    except RecursionError as exc:
        raise BodyError("request body content is nested too deeply") from exc
    return RequestEstimate(
        api=api,
        model=model,
        input_tokens=tally.total(),
        max_output_tokens=None if limit is None else limit * choices,
        stream=stream,
        include_usage=include_usage,
        choices=choices,
    )
