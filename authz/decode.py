"""Content-Encoding decoding with bounded output: a compressed body cannot become a bomb.

A megabyte of gzip can inflate to a gigabyte. Every call here produces at most
:data:`SLICE` bytes (``decompressobj().decompress(data, max_length)``, the rest of the
input kept in ``unconsumed_tail``), so the caller can hand the event loop back between
slices; and the total is capped: past ``limit`` decoded bytes, or past :data:`MAX_RATIO`
times the encoded bytes received, :class:`DecodeRefused` is raised and nothing more is
decoded.

Codings: gzip / x-gzip (several members too, as RFC 1952 allows), deflate (zlib-wrapped,
as RFC 9110 says, or raw, as some servers send it; told apart by the zlib header) and
identity. Anything else (br, zstd, a list of codings) is refused: the standard library
has no bounded decoder for it, so the caller charges the reservation instead.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator

__all__ = ["SLICE", "DecodeRefused", "Decoder", "decoder_for"]

log = logging.getLogger("authz.decode")

# Decoded bytes per step, then the event loop runs. Inflating it takes well under a ms;
# reading it as SSE a few ms at worst (events of a few bytes: ~1-2 us of Python each).
SLICE = 16 * 1024
_MEMBER_COST = 1024  # each extra gzip member counts this much, so empty ones add up too
# Decoded bytes allowed per encoded byte received, counted over the whole body. Honest
# JSON and SSE compress 2-8x (tests/fixtures/bodies), deflate can reach 1032x, and a bomb
# is near that. Reading a response costs CPU per decoded byte (an SSE event is ~1-2 us of
# Python), so this keeps a compressed body within 64x of what the same bytes would cost
# sent plain. Only a stream repeating one token thousands of times, compressed without a
# flush per event, passes 64x honestly: it is charged its reservation, which such a
# stream (run to its max_tokens) costs anyway.
MAX_RATIO = 64
_RATIO_FLOOR = 64 * 1024  # small bodies (headers and all) may inflate this much anyway


class DecodeRefused(Exception):
    """The body will not be decoded (further); ``reason`` is a stable label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # encoding_unsupported | decoded_too_large


def decoder_for(content_encoding: str, limit: int) -> Decoder | None:
    """A decoder for the response's Content-Encoding; None for an unencoded body."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip", "deflate"):
        return Decoder(coding != "deflate", limit)
    raise DecodeRefused("encoding_unsupported")


def _is_zlib(head: bytes) -> bool:
    """RFC 1950: CM = 8 (deflate), CINFO <= 7, and the header checksum holds."""
    return head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0


class Decoder:
    __slots__ = ("_gzip", "_head", "_z", "broken", "encoded", "limit", "total")

    def __init__(self, gzip: bool, limit: int) -> None:
        self._gzip = gzip
        self.limit = limit
        self.total = 0  # decoded bytes so far (plus the member cost)
        self.encoded = 0  # encoded bytes received so far
        self.broken = False  # corrupt input: stopped, what was decoded stands
        self._head = b""  # deflate: the first bytes, until zlib or raw is known
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None

    def decode(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``data``, at most :data:`SLICE` per item."""
        if self.broken or not data:
            return
        self.encoded += len(data)
        allowed = min(self.limit, max(_RATIO_FLOOR, MAX_RATIO * self.encoded))
        if self._z is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._head = b""
            self._z = zlib.decompressobj(zlib.MAX_WBITS if _is_zlib(data) else -zlib.MAX_WBITS)
        z = self._z
        while True:
            try:
                out = z.decompress(data, SLICE)
            except zlib.error as exc:
                # Corrupt: stop decoding; the response settles from what was read.
                log.info("response body stopped decoding: %s", exc)
                self.broken = True
                return
            self.total += len(out)
            if self.total > allowed:
                self.broken = True
                raise DecodeRefused("decoded_too_large")
            if out:
                yield out
            data = z.unconsumed_tail
            if z.eof:
                rest = z.unused_data
                if not (self._gzip and rest):
                    return  # the end; anything after a deflate stream is ignored
                self.total += _MEMBER_COST  # another gzip member follows
                z = self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                data = rest
                continue
            if not data and len(out) < SLICE:
                return  # all input taken and no output left pending
