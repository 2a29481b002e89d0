"""What one AI response costs: a protocol-free state machine fed by the ext_proc stream.

The gRPC layer (:mod:`authz.envoy.extproc`) feeds it headers and body chunks; it answers
how the body should be sent (buffered JSON or streamed SSE) and, at the end, the usage
to settle. Rules (see docs/design.md):
- no reservation (a local reply such as our own 429, or an unbudgeted request): nothing;
- a non-2xx upstream answer: release (the model did no work we can bill);
- JSON: the body's ``usage``; a body without usage keeps the reservation's estimate;
- SSE: the last usage seen once ``end_of_stream`` arrives; a stream cut short is charged
  from what was seen (input estimate + streamed text), never zero, never refunded whole.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import Enum

from authz.apis import Api, streams_sse
from authz.usage import SseUsageAccumulator, TokenUsage, parse_json_usage, usage_after_abort

__all__ = ["BodyMode", "Outcome", "ReservationInfo", "ResponseTracker"]

_MAX_JSON = 8 * 1024 * 1024


class BodyMode(Enum):
    NONE = "none"  # do not send us the body
    BUFFERED = "buffered"
    STREAMED = "streamed"


@dataclass(frozen=True, slots=True)
class ReservationInfo:
    """What ext_authz put in the dynamic metadata for this request."""

    reservation_id: str
    api: Api
    input_estimate: int
    output_reserved: int
    org: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "settled" | "released" | "aborted" | "estimated"
    usage: TokenUsage


class ResponseTracker:
    def __init__(self, info: ReservationInfo) -> None:
        self.info = info
        self.outcome: Outcome | None = None
        self._sse: SseUsageAccumulator | None = None
        self._json: bytearray | None = None
        self._gunzip: zlib._Decompress | None = None

    def on_headers(self, status: int, content_type: str, content_encoding: str) -> BodyMode:
        if not 200 <= status < 300:
            self.outcome = Outcome("released", TokenUsage(0, 0, 0))
            return BodyMode.NONE
        if content_encoding.strip().lower() in ("gzip", "x-gzip"):
            self._gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if streams_sse(content_type):
            self._sse = SseUsageAccumulator(self.info.api)
            return BodyMode.STREAMED
        self._json = bytearray()
        return BodyMode.BUFFERED

    def _plain(self, chunk: bytes) -> bytes:
        if self._gunzip is None or not chunk:
            return chunk
        try:
            return self._gunzip.decompress(chunk)
        except zlib.error:
            self._gunzip = None  # corrupt: stop decoding, settle from what we have
            return b""

    def on_body(self, chunk: bytes, end_of_stream: bool) -> Outcome | None:
        """Feed a chunk; returns the outcome once the response is complete."""
        if self.outcome is not None:
            return None
        data = self._plain(chunk)
        if self._sse is not None:
            self._sse.feed(data)
            if end_of_stream:
                self._sse.finish()
                usage = self._sse.usage
                if usage is None:
                    usage = usage_after_abort(self._sse, self.info.input_estimate)
                    self.outcome = Outcome("estimated", usage)
                else:
                    self.outcome = Outcome("settled", usage)
        elif self._json is not None:
            if len(self._json) < _MAX_JSON:
                self._json += data
            if end_of_stream:
                usage = parse_json_usage(self.info.api, bytes(self._json))
                if usage is None:
                    est = TokenUsage(
                        self.info.input_estimate, 0, self.info.output_reserved, exact=False
                    )
                    self.outcome = Outcome("estimated", est)
                else:
                    self.outcome = Outcome("settled", usage)
        return self.outcome

    def on_abort(self) -> Outcome:
        """The stream ended without end_of_stream (client gone, upstream reset)."""
        if self.outcome is not None:
            return self.outcome
        if self._sse is not None:
            self._sse.finish()
            usage = usage_after_abort(self._sse, self.info.input_estimate)
        else:
            # Headers never came, or a JSON body was cut: the model may have worked in
            # full, so keep what was reserved for the output too.
            usage = TokenUsage(self.info.input_estimate, 0, self.info.output_reserved, exact=False)
        self.outcome = Outcome("aborted", usage)
        return self.outcome
