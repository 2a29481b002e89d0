"""Server-Sent Events framing for streamed AI responses, fed chunk by chunk.

Envoy's ext_proc STREAMED mode hands over body chunks that do not line up with events,
lines or even UTF-8 characters, so this decoder works on bytes: it keeps only the
unfinished last line between chunks (never re-scanning what it already read) and
decodes an event once its blank line arrives. CR and LF bytes never occur inside a
multi-byte UTF-8 sequence, which is what makes splitting lines before decoding safe.

Framing follows the WHATWG EventSource rules: lines end in LF, CRLF or a lone CR; a
blank line ends an event; ``data:`` lines are joined with LF; lines starting with ``:``
are comments. Payloads that are ``[DONE]``, not JSON, or not a JSON object are skipped.
"""

from __future__ import annotations

import json
import re

from authz.apis import Api
from authz.estimate import tokens_for_chars
from authz.usage.anthropic import MessagesStream
from authz.usage.openai import ChatStream, ResponsesStream
from authz.usage.types import StreamReader, TokenUsage

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SseUsageAccumulator", "usage_after_abort"]

# Bound on one event (its unfinished line plus its data lines). A Responses API
# ``response.completed`` event repeats the instructions, the tools and the whole output,
# so a long but honest answer can pass 1 MiB; 4 MiB keeps those while still stopping a
# stream without newlines from growing memory without limit.
DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024
# Three or more CR/LF bytes in a row hold at least two line ends (CRLF is the longest):
# the first ends a line, the rest are blank lines, and one blank line does what many do.
_BLANK_RUN = re.compile(rb"[\r\n]{3,}")


def _reader_for(api: Api) -> StreamReader:
    if api is Api.ANTHROPIC_MESSAGES:
        return MessagesStream()
    if api is Api.OPENAI_RESPONSES:
        return ResponsesStream()
    return ChatStream()


class SseUsageAccumulator:
    """Reads usage out of one SSE response body, fed in arbitrary chunks."""

    __slots__ = (
        "_data",
        "_data_len",
        "_discard_event",
        "_discard_line",
        "_event",
        "_max",
        "_pending",
        "_pending_len",
        "_reader",
        "_skip_lf",
        "api",
    )

    def __init__(self, api: Api, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.api = api
        self._reader = _reader_for(api)
        self._max = max_event_bytes
        self._pending: list[bytes] = []  # pieces of the unfinished last line
        self._pending_len = 0
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it
        self._discard_line = False  # the unfinished line overflowed: drop it when it ends
        self._event = b""
        self._data: list[bytes] = []
        self._data_len = 0
        self._discard_event = False

    @property
    def usage(self) -> TokenUsage | None:
        """The usage the stream reported, once complete; None until then."""
        return self._reader.usage

    @property
    def output_chars(self) -> int:
        """Characters of generated text (content, reasoning, tool arguments) seen."""
        return self._reader.output_chars

    @property
    def output_tokens_seen(self) -> int:
        """The largest cumulative output token count the stream reported (0 if none)."""
        return self._reader.output_tokens_seen

    @property
    def input_tokens_seen(self) -> int | None:
        """All input tokens (cached or not) the stream announced; Anthropic does so first."""
        seen = self._reader.seen
        return seen.total_input if seen is not None else None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return
        cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if cut < 0:
            self._hold(chunk)
            return
        head = chunk[: cut + 1]
        if self._pending:
            head = b"".join(self._pending) + head
            self._pending.clear()
            self._pending_len = 0
        self._skip_lf = head[-1:] == b"\r"
        # A run of blank lines ends one event like a single blank line does: collapsed
        # in C, so a stream of bare newlines costs no Python call per byte.
        head = _BLANK_RUN.sub(b"\n\n", head)
        lines = head.splitlines()  # bytes.splitlines splits on LF, CRLF and CR only
        if self._discard_line:
            self._discard_line = False
            lines = lines[1:]  # what is left of the line that overflowed
        for line in lines:
            self._line(line)
        if cut + 1 < len(chunk):
            self._hold(chunk[cut + 1 :])

    def finish(self) -> None:
        """End of body: take a last line and event not closed by a blank line."""
        if self._pending and not self._discard_line:
            self._line(b"".join(self._pending))
        self._pending.clear()
        self._pending_len = 0
        self._discard_line = self._skip_lf = False
        self._dispatch()

    def _hold(self, piece: bytes) -> None:
        if self._discard_line:
            return
        self._pending.append(piece)
        self._pending_len += len(piece)
        if self._pending_len + self._data_len > self._max:
            self._pending.clear()
            self._pending_len = 0
            self._discard_line = True
            self._drop_event()

    def _drop_event(self) -> None:
        self._data.clear()
        self._data_len = 0
        self._discard_event = True

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if self._discard_event or line[:1] == b":":
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_len += len(value) + 1
            if self._data_len > self._max:
                self._drop_event()
        elif name == b"event":
            self._event = value

    def _dispatch(self) -> None:
        data, event = self._data, self._event
        self._data, self._data_len, self._event = [], 0, b""
        if self._discard_event:
            self._discard_event = False
            return
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if payload.lstrip()[:1] != b"{":  # [DONE], or anything not a JSON object: skip it
            return
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return
        if isinstance(obj, dict):
            self._reader.on_event(event.decode("utf-8", "replace"), obj)


def usage_after_abort(acc: SseUsageAccumulator, input_estimate: int) -> TokenUsage:
    """Usage to settle for a stream that ended without ``end_of_stream`` (client gone).

    The provider still bills what it generated before it noticed, so the charge is the
    most the stream showed: the exact usage if it arrived, else the input it announced
    (or the request-time ``input_estimate``) and the larger of the output count it
    reported and the output text seen, at the :func:`tokens_for_chars` rate.
    """
    if acc.usage is not None:
        return acc.usage
    seen = acc._reader.seen
    output = max(acc.output_tokens_seen, tokens_for_chars(acc.output_chars))
    if seen is not None:
        return TokenUsage(
            input_tokens=seen.input_tokens,
            cached_input_tokens=seen.cached_input_tokens,
            output_tokens=output,
            reasoning_tokens=min(seen.reasoning_tokens, output),
            exact=False,
        )
    return TokenUsage(max(input_estimate, 0), 0, output, exact=False)
