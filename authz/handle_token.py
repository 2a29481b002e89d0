"""A reservation handle as one opaque header value, for gateways that speak HTTP.

The gRPC Check hands ext_proc its reservation as separate metadata fields plus a MAC
(:mod:`authz.handles`). Over HTTP there is only room for headers: Envoy's
``http_service`` mode copies one response header into ext_authz's dynamic metadata
(``dynamic_metadata_from_headers``), and Kong keeps one value in ``kong.ctx.plugin``
until it settles. So the same signed fields travel as one string::

    h1.<base64url(JSON array of the Handle's fields)>.<MAC, 32 hex digits>

It is opaque to the gateway and to anyone who sees it: nothing in it is secret (the
subject and estimates), but only the service can make a MAC that verifies, so a
decoded and altered handle settles nothing. Decoding never trusts the text: the length
is capped before anything is parsed, and every field is type-checked; the caller then
verifies the MAC (:meth:`authz.handles.HandleKeys.verify`).
"""

from __future__ import annotations

import base64
import binascii
import json

from authz.apis import Api
from authz.handles import Handle, SettleRefusal

__all__ = ["HANDLE_HEADER", "MAX_TOKEN_CHARS", "decode_token", "encode_token"]

HANDLE_HEADER = "x-authz-handle"
# A handle is ~200 characters; a subject path is bounded by the claims it comes from.
# 4 KiB leaves room for long subjects and stays under every gateway's header limit.
MAX_TOKEN_CHARS = 4096
_PREFIX = "h1."
_FIELDS = len(Handle._fields)


def encode_token(handle: Handle, mac: str) -> str:
    fields = [*handle[:7], int(handle.stream), handle.output_cap]
    raw = json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()
    return f"{_PREFIX}{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{mac}"


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53:
        return value
    raise ValueError("not a count")


def decode_token(token: str) -> tuple[Handle, str] | SettleRefusal:
    """The handle and its MAC, unverified; MALFORMED if ``token`` is not one of ours."""
    if len(token) > MAX_TOKEN_CHARS or not token.startswith(_PREFIX):
        return SettleRefusal.MALFORMED
    body, dot, mac = token[len(_PREFIX) :].rpartition(".")
    if not dot or not mac:
        return SettleRefusal.UNSIGNED if dot else SettleRefusal.MALFORMED
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        f = json.loads(raw)
        if not isinstance(f, list) or len(f) != _FIELDS:
            raise ValueError("not a handle")
        strings = f[:5]
        if not all(isinstance(s, str) for s in strings) or _count(f[7]) > 1:
            raise ValueError("not a handle")
        handle = Handle(
            reservation_id=strings[0],
            subject=strings[1],
            org=strings[2],
            api=Api(strings[3]).value,
            model=strings[4],
            input_estimate=_count(f[5]),
            output_reserved=_count(f[6]),
            stream=_count(f[7]) == 1,
            output_cap=_count(f[8]),
        )
    except (ValueError, binascii.Error, RecursionError, UnicodeDecodeError):
        return SettleRefusal.MALFORMED
    return handle, mac
