"""Which AI API a request speaks, decided from its path and content type.

Gateways mount providers under prefixes (``/openai/v1/chat/completions``, Azure's
``/openai/deployments/<name>/chat/completions``), so the API is matched on the trailing
path segments, never on the whole path. Paths that name no metered API (retrieving a
stored response, counting tokens, batches, listing models) map to ``None``.

The path is matched in every reading an upstream might give it (:mod:`authz.paths`):
a request is metered when any reading is a metered API, so no spelling of a path is
cheaper than the plain one. :func:`route` then decides, for one request, between
metered, free (every reading listed in ``requests.unmetered``) and refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from authz.paths import PathRule, Segments, UnreadablePath, readings

__all__ = ["METERED_PATHS", "Api", "Route", "api_for_path", "apis_for_path", "route", "streams_sse"]


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


# The plain spelling of each metered API, for checks and messages.
METERED_PATHS: dict[Api, str] = {
    Api.OPENAI_CHAT: "/v1/chat/completions",
    Api.OPENAI_COMPLETIONS: "/v1/completions",
    Api.OPENAI_RESPONSES: "/v1/responses",
    Api.OPENAI_EMBEDDINGS: "/v1/embeddings",
    Api.ANTHROPIC_MESSAGES: "/v1/messages",
}


def _api_of(segments: Segments) -> Api | None:
    for suffix, api in _SUFFIXES:
        if segments[-len(suffix) :] == suffix:
            return api
    return None


def apis_for_path(path: str) -> frozenset[Api]:
    """Every metered API that some reading of ``path`` is (empty: none is).

    Raises :class:`~authz.paths.UnreadablePath` when the path has no reading to use.
    """
    return _apis(readings(path))


def _apis(seen: frozenset[Segments]) -> frozenset[Api]:
    return frozenset(api for s in seen if (api := _api_of(s)) is not None)


_SPECIFICITY = {api: len(suffix) for suffix, api in _SUFFIXES}


def _pick(apis: frozenset[Api]) -> tuple[Api, ...]:
    """The APIs with the most specific suffix among ``apis``: one, or a tie.

    Readings disagree mostly because one of them leaves a character undecoded, e.g.
    ``/v1/cha%74/completions`` is chat decoded and, as sent, ends in ``completions``.
    As within one reading, ``chat/completions`` beats ``completions``. Two APIs as
    specific as each other can only be a crafted path: the caller refuses it.
    """
    if len(apis) <= 1:
        return tuple(apis)
    best = max(_SPECIFICITY[api] for api in apis)
    return tuple(sorted(api for api in apis if _SPECIFICITY[api] == best))


def api_for_path(path: str) -> Api | None:
    """The metered API at ``path``, or ``None`` if no reading is one (or readings tie).

    For labelling (which error format a denial speaks); deciding uses :func:`route`,
    which refuses a path whose readings tie.
    """
    try:
        picked = _pick(apis_for_path(path))
    except UnreadablePath:
        return None
    return picked[0] if len(picked) == 1 else None


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: metered as ``api``, ``unmetered``, or refused."""

    api: Api | None = None
    unmetered: bool = False
    status: int = 0  # refused: 403 not listed, 400 no single reading
    detail: str = ""  # machine code: not_listed, ambiguous_path, path_too_long
    message: str = ""


def _shown(path: str) -> str:
    plain = path.split("?", 1)[0]
    return plain if len(plain) <= 200 else plain[:200] + "..."


def route(method: str, path: str, unmetered: Sequence[PathRule]) -> Route:
    """Metered, free or refused: what one request is, whatever the spelling of its path.

    A POST that any reading makes a metered API is metered as that API (the most
    specific, if readings differ; a tie is refused, 400): no list frees it. Any other
    request is free only when every reading of its path matches a rule of ``unmetered``
    for its method; otherwise it is refused (403), so a path the service does not know
    can never be a way around the budget.
    """
    method = method.upper()  # an upstream may well accept "post"
    try:
        seen = readings(path)
    except UnreadablePath as exc:
        return Route(status=400, detail=exc.code, message=f"{_shown(path)}: {exc}")
    apis = _pick(_apis(seen))
    if len(apis) > 1:
        names = ", ".join(api.value for api in apis)
        msg = f"{_shown(path)} reads as more than one API ({names}); send the plain path"
        return Route(status=400, detail="ambiguous_path", message=msg)
    if method == "POST" and apis:
        return Route(api=apis[0])
    if all(any(rule.matches(method, s) for rule in unmetered) for s in seen):
        return Route(unmetered=True)
    what = f"{method} {_shown(path)}"
    if apis:
        msg = f"{what}: only POST is metered on this API and {method} is not listed in"
    else:
        msg = f"{what} is not a metered AI API and not listed in"
    return Route(status=403, detail="not_listed", message=f"{msg} requests.unmetered")


def streams_sse(content_type: str) -> bool:
    """True when a response ``content-type`` announces Server-Sent Events.

    Parameters such as ``; charset=utf-8`` are ignored and media types compare
    case-insensitively (RFC 9110 section 8.3.1).
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "text/event-stream"
