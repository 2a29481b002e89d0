"""What one AI response costs: a protocol-free state machine fed by the ext_proc stream.

The gRPC layer (:mod:`authz.envoy.extproc`) feeds it headers and body chunks; it answers
how the body should be sent (buffered JSON or streamed SSE) and, at the end, the usage
to settle. Rules (see docs/design.md):
- no reservation (a local reply such as our own 429, or an unbudgeted request): nothing;
- a non-2xx upstream answer, or any answer the upstream did not send (a guardrail after
  ext_authz answering locally, a route's ``direct_response``, Envoy's 503 when the
  upstream cannot be reached), whatever its status: release (the model did no work);
- the client gone before any response header: a stream is charged its input estimate
  (a provider stops generating when the stream is cut), a JSON request what was
  reserved (the model may finish the answer nobody reads);
- JSON: the body's ``usage``; a body without usage keeps the reservation's estimate;
- SSE: the last usage seen once ``end_of_stream`` arrives; a stream cut short is charged
  from what was seen (input estimate + streamed text), never zero, never refunded whole.

The upstream is not trusted with our memory, our event loop or the budget:
- a compressed body (gzip, deflate) is decoded a slice at a time (:mod:`authz.decode`),
  at most ``bounds.response_decoded_bytes`` in all; past that, or in a coding we do not
  decode (br, zstd...), nothing more is read and the reservation is charged (input
  estimate + output reserved: never zero), recorded as a :class:`SettlementBound`;
- reported usage above what the request could have cost is clamped
  (:func:`authz.usage.bounds.bound_usage`), recorded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from authz.apis import Api, streams_sse
from authz.decode import SLICE, Decoder, DecodeRefused, decoder_for
from authz.offload import run_off_loop
from authz.policy.bounds import BoundsSettings
from authz.usage import SseUsageAccumulator, TokenUsage, parse_json_usage, usage_after_abort
from authz.usage.bounds import SettlementBound, bound_usage

__all__ = ["BodyMode", "Outcome", "ReservationInfo", "ResponseTracker"]

log = logging.getLogger("authz.settle")
_DEFAULT_BOUNDS = BoundsSettings()
# JSON bodies bigger than this are parsed off the event loop (authz.offload).
_INLINE_JSON = 256 * 1024


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
    output_cap: int = 0  # the output limit written into the request (0: none)
    stream: bool = False  # the request asked for a stream (signed in the handle)
    subject: str = ""  # the caller's path, e.g. org:acme/user:bob (signed in the handle)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "settled" | "released" | "aborted" | "estimated"
    usage: TokenUsage
    bound: SettlementBound | None = None  # set when usage is not what the upstream said
    # A big JSON body is parsed after Envoy got its reply (which waits at most its
    # message_timeout): then this is a placeholder, and ``later`` gives the real outcome.
    later: Callable[[], Awaitable[Outcome]] | None = None

    async def resolved(self) -> Outcome:
        """The outcome to settle: this one, or the one a deferred parse arrives at."""
        return self if self.later is None else await self.later()


class ResponseTracker:
    def __init__(self, info: ReservationInfo, bounds: BoundsSettings | None = None) -> None:
        self.info = info
        self.bounds = bounds or _DEFAULT_BOUNDS
        self.outcome: Outcome | None = None
        self._sse: SseUsageAccumulator | None = None
        self._json: bytearray | None = None
        self._decoder: Decoder | None = None
        self._refused: str | None = None  # why nothing more of the body is read

    def on_headers(
        self, status: int, content_type: str, content_encoding: str, *, upstream: bool = True
    ) -> BodyMode:
        """``upstream`` False: Envoy or a filter made this answer, not the model."""
        if not upstream or not 200 <= status < 300:
            self.outcome = Outcome("released", TokenUsage(0, 0, 0))
            return BodyMode.NONE
        try:
            self._decoder = decoder_for(content_encoding, self.bounds.response_decoded_bytes)
        except DecodeRefused as exc:
            # Nothing we can read: charge what was reserved now, and skip the body.
            self._refuse(exc.reason, content_encoding)
            self.outcome = self._reserved_outcome()
            return BodyMode.NONE
        if streams_sse(content_type):
            self._sse = SseUsageAccumulator(self.info.api)
            return BodyMode.STREAMED
        self._json = bytearray()
        return BodyMode.BUFFERED

    # -- feeding ------------------------------------------------------------------------
    def on_body(self, chunk: bytes, end_of_stream: bool) -> Outcome | None:
        """Feed a chunk; returns the outcome once the response is complete.

        Decodes the whole chunk before returning (bounded in size, not in time): the
        gRPC handler uses :meth:`feed`, which lets the event loop run between slices.
        """
        if self.outcome is not None:
            return None
        for piece in self._pieces(chunk):
            self._take(piece)
        if end_of_stream:
            self._finish(None if self._json is None else parse_json_usage(
                self.info.api, bytes(self._json)))  # fmt: skip
        return self.outcome

    async def feed(self, chunk: bytes, end_of_stream: bool) -> Outcome | None:
        """:meth:`on_body` that yields to the event loop between decoded slices and
        parses a big JSON body off the loop, so one response never holds every check."""
        if self.outcome is not None:
            return None
        pieces = self._pieces(chunk)
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0)  # the loop runs between slices
            self._take(piece)
        if end_of_stream:
            if self._json is None or self._refused is not None:
                self._finish(None)
            elif len(self._json) <= _INLINE_JSON:
                self._finish(parse_json_usage(self.info.api, bytes(self._json)))
            else:
                body = bytes(self._json)
                self._json.clear()

                async def later() -> Outcome:
                    self._finish(await run_off_loop(parse_json_usage, self.info.api, body))
                    assert self.outcome is not None
                    return self.outcome

                self.outcome = Outcome("estimated", self._reserved(), later=later)
        return self.outcome

    def on_abort(self) -> Outcome:
        """The stream ended without end_of_stream (client gone, upstream reset)."""
        if self.outcome is not None:
            return self.outcome
        if self._refused is not None:
            self.outcome = self._reserved_outcome("aborted")
        elif self._sse is not None:
            self._sse.finish()
            # The stream's final usage came: the response is complete as far as billing
            # goes, only its last bytes ([DONE], the chunk terminator) were not seen.
            # The openai SDK's sync stream closes right at ``data: [DONE]``, which races
            # Envoy's end_of_stream: that is an ordinary, whole answer, settled as one.
            complete = self._sse.usage is not None
            usage = usage_after_abort(self._sse, self.info.input_estimate)
            self.outcome = self._bounded("settled" if complete else "aborted", usage)
        elif self._json is None and self.info.stream:
            # No response header yet and a stream was asked for: the client left before
            # the first byte, Envoy reset the upstream stream, and a provider stops
            # generating when its stream is cut. The prompt was sent: charge it, never
            # the output reserved (issue 16: nothing beyond what was produced).
            self.outcome = Outcome(
                "aborted", TokenUsage(self.info.input_estimate, 0, 0, exact=False)
            )
        else:
            # A JSON body was cut, or a JSON request lost its client before the answer:
            # the model may have worked in full, so keep what was reserved for the output.
            self.outcome = Outcome("aborted", self._reserved())
        return self.outcome

    def copy_truncated(self) -> Outcome:
        """The gateway's copy of the body stopped short (at its copy limit, the HTTP
        settle endpoint's ``x-authz-truncated``): what came after the cut, the usage
        included, was never seen. Charged like a body too big to decode: the reservation."""
        self._refuse("copy_truncated", "")
        return self.on_abort()

    # -- inside ---------------------------------------------------------------------------
    def _pieces(self, chunk: bytes) -> Iterator[bytes]:
        if self._refused is not None or not chunk:
            return
        if self._decoder is None:
            if self._sse is None:
                yield chunk  # JSON is only appended here, parsed once at the end
            else:  # read a slice at a time, as decoded bodies are
                yield from (chunk[i : i + SLICE] for i in range(0, len(chunk), SLICE))
            return
        try:
            yield from self._decoder.decode(chunk)
        except DecodeRefused as exc:
            self._refuse(exc.reason, "")

    def _take(self, data: bytes) -> None:
        if self._sse is not None:
            self._sse.feed(data)
        elif self._json is not None and self._refused is None:
            if len(self._json) + len(data) > self.bounds.response_decoded_bytes:
                # Envoy buffers no more than this plain; nothing honest is bigger.
                self._refuse("decoded_too_large", "")
                self._json.clear()
            else:
                self._json += data

    def _finish(self, json_usage: TokenUsage | None) -> None:
        if self._refused is not None:
            self.outcome = self._reserved_outcome()
        elif self._sse is not None:
            self._sse.finish()
            usage = self._sse.usage
            if usage is None:
                self.outcome = self._bounded(
                    "estimated", usage_after_abort(self._sse, self.info.input_estimate)
                )
            else:
                self.outcome = self._bounded("settled", usage)
        elif self._json is not None:
            if json_usage is None:
                self.outcome = Outcome("estimated", self._reserved())
            else:
                self.outcome = self._bounded("settled", json_usage)

    def _reserved(self) -> TokenUsage:
        return TokenUsage(self.info.input_estimate, 0, self.info.output_reserved, exact=False)

    def _limits(self) -> tuple[int, int]:
        i = self.info
        return self.bounds.usage.limits(i.model, i.input_estimate, i.output_reserved)

    def _event(self, reason: str, reported: TokenUsage | None, charged: TokenUsage,
               limits: tuple[int, int]) -> SettlementBound:  # fmt: skip
        i = self.info
        return SettlementBound(reason, i.reservation_id, i.org, i.model, reported, charged,
                               *limits)  # fmt: skip

    def _bounded(self, kind: str, usage: TokenUsage) -> Outcome:
        i = self.info
        charged, limits = bound_usage(
            usage, self.bounds.usage, i.model, i.input_estimate, i.output_reserved
        )
        if limits is None:
            return Outcome(kind, usage)
        return Outcome(kind, charged, self._event("usage_above_bound", usage, charged, limits))

    def _reserved_outcome(self, kind: str = "estimated") -> Outcome:
        assert self._refused is not None
        charged = self._reserved()
        return Outcome(kind, charged, self._event(self._refused, None, charged, self._limits()))

    def _refuse(self, reason: str, coding: str) -> None:
        if self._refused is not None:
            return
        self._refused = reason
        self._decoder = None  # the mode stays (SSE or JSON); nothing more is read
        log.warning(
            "response body not read: %s; charging the reservation",
            reason,
            extra={"reservation": self.info.reservation_id, "org": self.info.org,
                   "content_encoding": coding or None,
                   "decoded_limit": self.bounds.response_decoded_bytes},
        )  # fmt: skip
