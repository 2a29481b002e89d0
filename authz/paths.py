"""Every reading of a request path that an upstream might act on, and path patterns.

The service decides what a request costs from its path; the upstream decides what it
serves from the same path. Any gap between the two readings is a way around the budget:
``/v1/chat/%63ompletions`` was once passed free while the upstream decoded it and served
a chat completion. So a path is never matched as sent. It is read every way a plausible
upstream, or a proxy in front of one, might read it, and the callers decide on the set:
metered when ANY reading is a metered API, free only when EVERY reading is listed free.

A reading is the path after:

- cutting the query and fragment (at the first ``?`` or ``#``);
- percent-decoding 0, 1, ... times up to a fixed point, so a double encoding such as
  ``%2563`` (``%63`` after one decode, ``c`` after two) is read at every depth; a ``?``
  or ``#`` that a decode reveals is read both as a cut and as a character;
- splitting on ``/``, with ``%2F``, ``%5C`` and ``\\`` read both as separators (Envoy
  with ``UNESCAPE_AND_FORWARD``, many frameworks) and as characters (RFC 3986);
- dropping ``;params`` from each segment (Tomcat, Spring: the ``..;/`` trick) or not;
- dropping empty segments (``//``, a trailing ``/``) and resolving ``.`` and ``..``;
- lowercasing: some OpenAI-compatible servers match routes case-insensitively.

A path that still decodes to something new after ``MAX_DECODES`` rounds has no stable
reading, and one longer than ``MAX_PATH`` characters (before the query) costs too much
to read every way: both raise :class:`UnreadablePath`, which the caller refuses rather
than guesses at. No API path of an LLM provider comes near that length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

__all__ = [
    "MAX_DECODES",
    "MAX_PATH",
    "PathRule",
    "Segments",
    "UnreadablePath",
    "parse_path_rule",
    "readings",
]

MAX_DECODES = 4
# Readings x segments: 1 KiB of the worst characters (escaped escapes, %2F, ;, .)
# costs 1.5-3.5 ms on the event loop, so longer paths are refused. Only short paths
# are memoised, so the cache holds at most ~1024 x 256 characters.
MAX_PATH = 1024
_CACHED_PATH = 256
Segments = tuple[str, ...]

_SLASH_ESCAPE = re.compile(r"(%2[fF]|%5[cC])")
_RULE = re.compile(r"^([A-Za-z]+|\*) +(/\S*)$")
_FORBIDDEN_IN_PATTERN = re.compile(r"[%?#;\\]")


class UnreadablePath(ValueError):
    """The path has no reading to decide on; ``code`` says why (a stable string)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # ambiguous_path | path_too_long


def _decode(text: str, slashes: bool) -> str:
    """One percent-decoding round; with ``slashes=False`` escaped separators stay as is."""
    if slashes:
        return unquote(text, errors="replace")
    parts = _SLASH_ESCAPE.split(text)
    # Odd indexes are the separators the split kept: leave them encoded.
    return "".join(p if i % 2 else unquote(p, errors="replace") for i, p in enumerate(parts))


def _segments(text: str, strip_params: bool) -> Segments:
    out: list[str] = []
    for seg in text.split("/"):
        if strip_params:
            seg = seg.split(";", 1)[0]
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg.lower())
    return tuple(out)


def readings(path: str) -> frozenset[Segments]:
    """Every plausible reading of ``path``, as lowercase segment tuples.

    Raises :class:`UnreadablePath` for a path over MAX_PATH characters (query and
    fragment excluded) or one that still decodes after MAX_DECODES rounds.
    """
    raw = path.split("?", 1)[0].split("#", 1)[0]
    if len(raw) > MAX_PATH:
        raise UnreadablePath("path_too_long", f"longer than {MAX_PATH} characters")
    # Clients send a handful of distinct paths: memoise those, in bounded memory.
    return _cached(raw) if len(raw) <= _CACHED_PATH else _read(raw)


@lru_cache(maxsize=1024)
def _cached(raw: str) -> frozenset[Segments]:
    return _read(raw)


def _read(raw: str) -> frozenset[Segments]:
    texts: set[str] = set()
    for slashes in (True, False):
        text = raw
        for _ in range(MAX_DECODES + 1):
            texts.add(text.replace("\\", "/") if slashes else text)
            decoded = _decode(text, slashes)
            if decoded == text:
                break
            text = decoded
        else:
            msg = f"still percent-encoded after {MAX_DECODES} decodes"
            raise UnreadablePath("ambiguous_path", msg)
    for text in list(texts):
        cut = text.split("?", 1)[0].split("#", 1)[0]
        texts.add(cut)
    return frozenset(_segments(t, strip) for t in texts for strip in (True, False))


@dataclass(frozen=True, slots=True)
class PathRule:
    """``METHOD /pattern``: a method (``*``: any) and a normalised path pattern.

    In the pattern, a ``*`` segment matches exactly one segment and a final ``**``
    matches any number (zero included). Segments compare lowercase, as readings do.
    """

    text: str
    method: str
    segments: Segments

    def matches(self, method: str, segments: Segments) -> bool:
        if self.method != "*" and self.method != method:
            return False
        pattern = self.segments
        if pattern and pattern[-1] == "**":
            pattern = pattern[:-1]
            if len(segments) < len(pattern):
                return False
            segments = segments[: len(pattern)]
        elif len(segments) != len(pattern):
            return False
        return all(p == "*" or p == s for p, s in zip(pattern, segments, strict=True))

    def __str__(self) -> str:
        return self.text


def parse_path_rule(text: str) -> PathRule | str:
    """A :class:`PathRule` from ``"GET /v1/models/*"``, or why ``text`` is not one."""
    m = _RULE.match(text.strip())
    if m is None:
        return 'must be "METHOD /path", e.g. "GET /v1/models"'
    method, path = m.group(1).upper(), m.group(2)
    if _FORBIDDEN_IN_PATTERN.search(path):
        return "the path must be plain: no %-escapes, query, fragment, ;params or backslash"
    segments = tuple(path.lower().split("/")[1:])
    if path == "/":
        segments = ()
    for i, seg in enumerate(segments):
        if seg in ("", ".", ".."):
            return "the path must be normalised: no empty, '.' or '..' segments, no trailing /"
        if "*" in seg and seg not in ("*", "**"):
            return "'*' must be a whole segment (one segment) or a final '**' (any number)"
        if seg == "**" and i != len(segments) - 1:
            return "'**' may only be the last segment"
    return PathRule(text.strip(), method, segments)
