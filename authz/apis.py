"""Which AI API a request speaks, decided from its path and content type.

Gateways mount providers under prefixes (``/openai/v1/chat/completions``, Azure's
``/openai/deployments/<name>/chat/completions``), so the API is matched on the trailing
path segments, never on the whole path. Paths that only read or list things (retrieving a
stored response, counting tokens, batches) map to ``None``: they spend no tokens.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Api", "api_for_path", "streams_sse"]


class Api(StrEnum):
    OPENAI_CHAT = "openai.chat"
    OPENAI_COMPLETIONS = "openai.completions"
    OPENAI_RESPONSES = "openai.responses"
    OPENAI_EMBEDDINGS = "openai.embeddings"
    ANTHROPIC_MESSAGES = "anthropic.messages"


# Longest suffixes first: ``chat/completions`` must win over ``completions``.
_SUFFIXES: tuple[tuple[tuple[str, ...], Api], ...] = (
    (("chat", "completions"), Api.OPENAI_CHAT),
    # The Anthropic SDK always appends ``/v1/messages`` to its base URL. Requiring the
    # ``v1`` keeps OpenAI's ``/v1/threads/<id>/messages`` and
    # ``/v1/chat/completions/<id>/messages`` (both reads) from matching.
    (("v1", "messages"), Api.ANTHROPIC_MESSAGES),
    (("completions",), Api.OPENAI_COMPLETIONS),
    (("responses",), Api.OPENAI_RESPONSES),
    (("embeddings",), Api.OPENAI_EMBEDDINGS),
)


def api_for_path(path: str) -> Api | None:
    """The API served at ``path`` (query string and fragment ignored), or ``None``."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    segments = tuple(s for s in path.split("/") if s)
    for suffix, api in _SUFFIXES:
        if segments[-len(suffix) :] == suffix:
            return api
    return None


def streams_sse(content_type: str) -> bool:
    """True when a response ``content-type`` announces Server-Sent Events.

    Parameters such as ``; charset=utf-8`` are ignored and media types compare
    case-insensitively (RFC 9110 section 8.3.1).
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "text/event-stream"
