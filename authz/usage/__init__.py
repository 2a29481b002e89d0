"""Response bytes -> :class:`TokenUsage`, for every supported AI API.

Framework-free on purpose: the ext_proc handler feeds bytes in and reads numbers out,
and these parsers are tested on recorded bodies without Envoy or gRPC.

- :func:`parse_json_usage` reads a complete, non-streamed JSON response;
- :class:`SseUsageAccumulator` reads a Server-Sent Events response chunk by chunk;
- :func:`usage_after_abort` settles a stream the client left before its end.

Nothing here raises on malformed upstream bodies: "no usage" is ``None``, and the caller
decides what to charge.
"""

from __future__ import annotations

import json

from authz.apis import Api
from authz.usage.anthropic import message_usage
from authz.usage.openai import chat_usage, responses_usage, with_tier
from authz.usage.sse import SseUsageAccumulator, usage_after_abort
from authz.usage.types import TokenUsage

__all__ = ["SseUsageAccumulator", "TokenUsage", "parse_json_usage", "usage_after_abort"]


def parse_json_usage(api: Api, body: bytes) -> TokenUsage | None:
    """The usage in a complete JSON response body, or None if it has none or is not JSON."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if api is Api.ANTHROPIC_MESSAGES:
        return message_usage(usage)
    found = responses_usage(usage) if api is Api.OPENAI_RESPONSES else chat_usage(usage)
    return with_tier(found, obj)
