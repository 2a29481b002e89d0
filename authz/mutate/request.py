"""Request bodies the service rewrites before they go upstream.

Two changes, made in one parse and one re-encode:

- OpenAI streams report usage only when asked (``stream_options.include_usage``), so
  the service asks for it on streamed Chat Completions and Completions requests, and
  settles the stream exactly.
- A request admitted with its output lowered to what its budget has left (Check
  decides the cap, :mod:`authz.output_cap`, and signs it into the handle) gets that
  limit written into the body, so the model stops there instead of running past the
  reservation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from authz.apis import Api

__all__ = [
    "REWRITE_MAX_BYTES",
    "USAGE_APIS",
    "CapUnwritable",
    "RequestChanges",
    "cap_fields",
    "rewrite_request",
    "with_include_usage",
]


@dataclass(slots=True)
class RequestChanges:
    """What the service changed in one request body, kept for its response.

    The client must see what the upstream would have sent it: whatever the service
    added to the request, the response phase undoes the visible effect of.
    """

    added_include_usage: bool = False  # the service, not the client, asked for usage
    output_cap: int | None = None  # the output limit written into the body ...
    capped_fields: tuple[str, ...] = ()  # ... in these fields (lowered, or added)
    refused: bool = False  # the cap could not be written: answered 429, released


# The largest request body rewritten here: what Envoy's ext_authz forwards to Check (a
# bigger body was checked as truncated, and is left as it is).
REWRITE_MAX_BYTES = 1024 * 1024
# Every output limit any of these APIs documents: an OpenAI-compatible upstream may obey
# any of them (authz.estimate reserves the largest), so each one present is lowered.
_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The APIs whose streams report usage only when asked (stream_options.include_usage).
USAGE_APIS = (Api.OPENAI_CHAT, Api.OPENAI_COMPLETIONS)
# The field added when the body names none. Chat: max_completion_tokens, OpenAI's
# current field; reasoning models (o1, o3, ...) reject max_tokens, and every current
# chat model takes max_completion_tokens.
_ADDED_FIELD = {
    Api.OPENAI_CHAT: "max_completion_tokens",
    Api.OPENAI_COMPLETIONS: "max_tokens",
    Api.OPENAI_RESPONSES: "max_output_tokens",
    Api.ANTHROPIC_MESSAGES: "max_tokens",
}


class CapUnwritable(ValueError):
    """A cap must be written but the body cannot be rewritten (too big, not a JSON
    object): the request must not go upstream uncapped."""


def _load(body: bytes) -> dict[str, Any] | None:
    if len(body) > REWRITE_MAX_BYTES:
        return None  # bigger than Check reads (bounds.request_body_bytes): not ours to fix
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return obj if isinstance(obj, dict) else None


def _dump(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800) cannot be UTF-8
        return json.dumps(obj, separators=(",", ":")).encode()


def _add_usage(obj: dict[str, Any]) -> bool:
    # OpenAI rejects stream_options without "stream": true.
    if obj.get("stream") is not True:
        return False
    options = {} if obj.get("stream_options") is None else obj["stream_options"]
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    obj["stream_options"] = {**options, "include_usage": True}
    return True


def cap_fields(obj: dict[str, Any], api: Api, cap: int) -> tuple[str, ...]:
    """Lower every output limit in ``obj`` above ``cap`` to it; when it names none, add
    the API's own field. Returns the fields written."""
    named = [f for f in _LIMIT_FIELDS if obj.get(f) is not None]
    written = []
    for f in named:
        value = obj[f]
        if not (isinstance(value, int) and not isinstance(value, bool) and value <= cap):
            obj[f] = cap
            written.append(f)
    if not named:
        field = _ADDED_FIELD.get(api, "max_tokens")
        obj[field] = cap
        written.append(field)
    return tuple(written)


def rewrite_request(
    body: bytes, api: Api, changes: RequestChanges, *, add_usage: bool, cap: int | None
) -> bytes | None:
    """``body`` with usage asked for (``add_usage``, streams only) and the output limit
    lowered to ``cap``; None when nothing changed (leave the body alone). ``changes``
    records what was done. Keys keep their order; the JSON is re-encoded.

    Raises :class:`CapUnwritable` when ``cap`` is set and the body cannot be parsed.
    """
    if cap is None and not add_usage:
        return None
    obj = _load(body)
    if obj is None:
        if cap is not None:
            raise CapUnwritable("the request body is too big or not a JSON object")
        return None
    added = add_usage and _add_usage(obj)
    written = cap_fields(obj, api, cap) if cap is not None else ()
    if not added and not written:
        return None
    changes.added_include_usage = added
    if cap is not None:
        changes.output_cap, changes.capped_fields = cap, written
    return _dump(obj)


def with_include_usage(body: bytes) -> bytes | None:
    """``body`` with ``stream_options.include_usage`` set, so the stream reports usage.

    For OpenAI Chat Completions and Completions requests with ``"stream": true``. None
    when the option is already on or the body is not a streaming request object; the
    caller must then leave the body alone.
    """
    return rewrite_request(body, Api.OPENAI_CHAT, RequestChanges(), add_usage=True, cap=None)
