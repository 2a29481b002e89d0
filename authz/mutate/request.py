"""Request bodies the service rewrites before they go upstream.

Today one change: OpenAI streams report usage only when asked
(``stream_options.include_usage``), so the service asks for it on streamed Chat
Completions and Completions requests, and settles the stream exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["REWRITE_MAX_BYTES", "RequestChanges", "with_include_usage"]


@dataclass(slots=True)
class RequestChanges:
    """What the service changed in one request body, kept for its response.

    The client must see what the upstream would have sent it: whatever the service
    added to the request, the response phase undoes the visible effect of.
    """

    added_include_usage: bool = False  # the service, not the client, asked for usage

# The largest request body :func:`with_include_usage` rewrites: what Envoy's ext_authz
# forwards to Check (a bigger body was checked as truncated, and is left as it is).
REWRITE_MAX_BYTES = 1024 * 1024


def with_include_usage(body: bytes) -> bytes | None:
    """``body`` with ``stream_options.include_usage`` set, so the stream reports usage.

    For OpenAI Chat Completions and Completions requests with ``"stream": true`` (OpenAI
    rejects ``stream_options`` without it). None when the option is already on or the
    body is not a streaming request object; the caller must then leave the body alone,
    and otherwise fix ``content-length``. Keys keep their order; the JSON is re-encoded.
    """
    if len(body) > REWRITE_MAX_BYTES:
        return None  # bigger than Check reads (bounds.request_body_bytes): not ours to fix
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = {} if obj.get("stream_options") is None else obj["stream_options"]
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    obj["stream_options"] = {**options, "include_usage": True}
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800) cannot be UTF-8
        return json.dumps(obj, separators=(",", ":")).encode()
