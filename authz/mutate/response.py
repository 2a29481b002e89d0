"""Response streams the service rewrites on their way back to the client.

Today one change, the undo of :func:`authz.mutate.request.with_include_usage`: when the
service (not the client) asked an OpenAI Chat Completions or Completions stream for
``stream_options.include_usage``, the upstream adds ``"usage": null`` to every chunk
and one last chunk with ``"choices": []`` and the usage. Code written against a stream
without usage (``chunk.choices[0].delta.content``) breaks on that chunk, so
:class:`UsageChunkRemover` takes both out again: the client gets the bytes the upstream
would have sent it. The settlement reads the usage from the upstream's bytes, before
this runs.

Envoy's STREAMED chunks do not line up with SSE events, so an unfinished trailing event
is held back and sent with the next chunk (a client dispatches nothing before an
event's blank line anyway). If a reply misses Envoy's ext_proc ``message_timeout``, the
shipped config fails open: the rest of the stream passes as the upstream sent it, and
an event held back at that moment is lost to the client (cut mid-event); a reply takes
microseconds (``python -m bench.stream_chunk``) against a 0.5 s timeout.

Every byte outside the removed member or event passes unchanged, and so does whatever
is not an OpenAI chunk we can read: comments, ``[DONE]``, data that is not a ``{...}``
object, a member we cannot tell is the top-level one, a usage-only chunk that does
not parse. Framing follows the WHATWG EventSource rules, as :mod:`authz.usage.sse`
does: lines end in LF, CRLF or a lone CR; a blank line ends an event; ``data:`` lines
(with or without the space) join with LF.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from authz.apis import Api
from authz.mutate.request import RequestChanges
from authz.usage.sse import DEFAULT_MAX_EVENT_BYTES

__all__ = ["UsageChunkRemover", "usage_remover"]

# Two line ends in a row: the end of an event. A CR followed by LF is one line end
# (CRLF), never two: else "\r\n" at the end of a chunk would read as a blank line.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# Keys are found with bytes.find, their values checked with these anchored matches: a
# regex search over every chunk costs several times more.
_NULL_VALUE = re.compile(rb"\s*:\s*null(?=\s*[,}])")
_EMPTY_LIST = re.compile(rb"\s*:\s*\[\s*\]")
# A data line holds no line end: blanks around a removed comma are spaces and tabs.
_COMMA_AFTER = re.compile(rb"[ \t]*,[ \t]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def usage_remover(
    api: Api, changes: RequestChanges, content_encoding: str
) -> UsageChunkRemover | None:
    """The rewriter for one streamed response, or None if it passes as it is.

    Only when the service added ``include_usage``: a client that asked for usage itself
    gets it. Anthropic and Responses API streams report usage unasked, and are never
    touched. A compressed body passes unchanged: the shipped Envoy asks the upstream for
    ``accept-encoding: identity``, so only an upstream that compresses anyway gets here,
    and its client then sees the usage chunk rather than a re-encoded body.
    """
    if not changes.added_include_usage or api not in (Api.OPENAI_CHAT, Api.OPENAI_COMPLETIONS):
        return None
    if content_encoding.strip().lower() not in ("", "identity"):
        return None
    return UsageChunkRemover()


class UsageChunkRemover:
    """Removes from one SSE stream what ``include_usage`` added, chunk by chunk."""

    __slots__ = ("_held", "_passthrough")

    def __init__(self) -> None:
        self._held = b""  # the unfinished event at the end of what came so far
        self._passthrough = False  # an event too big to hold: the rest goes as it is

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """The bytes to send the client for ``chunk``: ``chunk`` itself when unchanged."""
        held = self._held
        if self._passthrough:
            return chunk
        buf = held + chunk if held else chunk
        out: list[bytes] = []
        changed = bool(held)
        cut = 0
        for end in _event_ends(buf, max(0, len(held) - 4)):
            # A CR at the very end may be the first half of a CRLF: wait for the next byte.
            if not end_of_stream and end == len(buf) and buf[-1:] == b"\r":
                break
            event = buf[cut:end]
            kept = _rewrite(event)
            changed = changed or kept is not event
            out.append(kept)
            cut = end
        rest = buf[cut:]
        if end_of_stream or len(rest) > DEFAULT_MAX_EVENT_BYTES:
            self._passthrough = not end_of_stream  # too big to hold: give up, unchanged
            out.append(rest)
            rest = b""
        self._held = rest
        if not changed and not rest:
            return chunk
        return b"".join(out)


def _event_ends(buf: bytes, pos: int) -> Iterator[int]:
    """Where each event in ``buf`` ends (after its blank line), searching from ``pos``."""
    if b"\r" not in buf:  # the usual LF-only stream: a C search, no regex
        at = buf.find(b"\n\n", pos)
        while at >= 0:
            yield at + 2
            at = buf.find(b"\n\n", at + 2)
        return
    for m in _EVENT_END.finditer(buf, pos):
        yield m.end()


def _rewrite(event: bytes) -> bytes:
    """One whole event (with its blank line): itself, without ``"usage": null``, or b""
    for the usage-only chunk."""
    if b'"usage"' not in event:
        return event
    if event[:5] == b"data:" and event.find(b"\n") == len(event) - 2 and b"\r" not in event:
        # The usual event, one data line ending in LF LF: no line splitting.
        start = 6 if event[5:6] == b" " else 5
        lines, where, values = [event], [(0, start)], [event[start:-2]]
    else:
        lines, where, values = _data_lines(event)
    payload = values[0] if len(values) == 1 else b"\n".join(values)
    body = payload.strip()
    if body[:1] != b"{" or body[-1:] != b"}":
        return event  # not a JSON object: [DONE], a comment, anything else
    if _has(payload, b'"choices"', _EMPTY_LIST) and _usage_only(payload):
        return b""  # the chunk include_usage added
    span = _null_member(payload)
    if span is None or b"\n" in payload[span[0] : span[1]]:
        return event  # none, not at the top, or across data lines: leave it
    offset = 0
    for (i, start), value in zip(where, values, strict=True):
        if span[0] <= offset + len(value):
            line = lines[i]
            a, b = start + span[0] - offset, start + span[1] - offset
            lines[i] = line[:a] + line[b:]
            return b"".join(lines)
        offset += len(value) + 1
    return event  # unreachable: the span lies in the payload


def _data_lines(event: bytes) -> tuple[list[bytes], list[tuple[int, int]], list[bytes]]:
    """The event's lines, and (line, where its value starts) and value of each data line."""
    lines = event.splitlines(keepends=True)
    where: list[tuple[int, int]] = []
    values: list[bytes] = []
    for i, line in enumerate(lines):
        text = line.rstrip(b"\r\n")
        name, colon, value = text.partition(b":")
        if name != b"data":
            continue  # comments, event:, id:, retry:, blank lines
        start = len(name) + len(colon)
        if value[:1] == b" ":
            start += 1
            value = value[1:]
        where.append((i, start))
        values.append(value)
    return lines, where, values


def _has(payload: bytes, key: bytes, value: re.Pattern[bytes]) -> bool:
    """Whether ``key`` is followed by what ``value`` matches, anywhere in ``payload``."""
    at = payload.find(key)
    while at >= 0:
        if value.match(payload, at + len(key)) is not None:
            return True
        at = payload.find(key, at + len(key))
    return False


def _usage_only(payload: bytes) -> bool:
    """Whether this is the chunk ``include_usage`` adds: no choices, the usage."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def _null_member(payload: bytes) -> tuple[int, int] | None:
    """Where the top-level ``"usage": null`` member is, with the comma that separates it
    from a neighbour; None unless there is exactly one.

    Found without parsing the JSON (a parse would double this cost, and every chunk
    pays it): a key always follows ``{`` or ``,``, and inside a string a quote is
    escaped, so a match is a member, never string content; its depth is counted over
    the shorter side of it, strings removed.
    """
    found = []
    at = payload.find(b'"usage"')
    while at >= 0:
        value = _NULL_VALUE.match(payload, at + 7)
        if (
            value is not None
            and payload[:at].rstrip()[-1:] in (b"{", b",")
            and _top_level(payload, at, value.end())
        ):
            found.append((at, value.end()))
        at = payload.find(b'"usage"', at + 7)
    if len(found) != 1:
        return None
    start, end = found[0]
    after = _COMMA_AFTER.match(payload, end)
    if after is not None:
        return start, after.end()  # "usage": null, "next": ...
    head = payload[:start].rstrip(b" \t")
    if head[-1:] == b",":
        return len(head[:-1].rstrip(b" \t")), end  # ..., "usage": null}
    return start, end  # {"usage": null}


def _top_level(payload: bytes, start: int, end: int) -> bool:
    """Whether the member at ``start:end`` is directly inside the outermost object."""
    if len(payload) - end < start:  # count what closes after it
        tail = payload[end:]
        if tail.count(b"}") == 1 and b"{" not in tail and b"[" not in tail and b"]" not in tail:
            return True  # only the final brace (the payload ends in it): no strings to strip
        tail = _STRING.sub(b"", tail)
        return tail.count(b"}") + tail.count(b"]") - tail.count(b"{") - tail.count(b"[") == 1
    head = _STRING.sub(b"", payload[:start])
    return head.count(b"{") + head.count(b"[") - head.count(b"}") - head.count(b"]") == 1
