"""Reservation handles: what lets an ext_proc stream settle a reservation, and only that.

Check puts a reservation in Envoy's ext_authz dynamic metadata; ext_proc reads it back
and settles. Whoever can open a Process stream (anyone who reaches the gRPC port, if
mTLS is off or a gateway is compromised) could otherwise settle any reservation whose id
it has seen, with any usage, or "release" it with a forged upstream error. So Check
signs every field that settlement trusts (id, subject, org, api, model, estimates,
stream, output cap) with HMAC-SHA256 under a key that never leaves the service, and ext_proc
settles nothing whose MAC does not verify. Only the MAC is a capability: the id on
its own, seen in a trace or a log, settles nothing. A leaked MAC would let its holder
settle that one reservation, once, before the gateway does; so the MAC travels only in
the ext_authz metadata that Envoy forwards to ext_proc, and the shipped access log
leaves it out.

Where the key comes from (a file, Redis, or a random per-process key) is
:mod:`authz.handle_keys`; this module is pure and framework-free.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from enum import Enum
from typing import NamedTuple

__all__ = [
    "MAC_FIELD",
    "MIN_KEY_BYTES",
    "Handle",
    "HandleKeys",
    "SettleRefusal",
    "key_fingerprint",
    "reservation_org",
]

MAC_FIELD = "mac"  # the metadata key the MAC travels under
MIN_KEY_BYTES = 32
_MAC_BYTES = 16  # 128 bits: forging one is 2**128 guesses, each a full settle attempt
_VERSION = "h1"  # bump if the signed message changes: old MACs then fail, never mis-verify
_OLD_KEYS = 4  # keys kept for verifying after a switch (see HandleKeys.adopt)
_BLOCK = 64  # SHA-256's block size, for HMAC's key padding


class SettleRefusal(Enum):
    """Why a settle was refused: the ``reason`` label of ``authz_settle_refused_total``."""

    UNSIGNED = "unsigned"  # a reservation id with no MAC beside it
    FORGED = "forged"  # a MAC that does not match the fields (or another key's MAC)
    ORG_MISMATCH = "org_mismatch"  # the org is not the one the reservation id carries
    MALFORMED = "malformed"  # a field of the wrong kind (unknown api, NaN estimate...)


class Handle(NamedTuple):
    """Everything settlement trusts about one reservation.

    A NamedTuple, not a frozen dataclass: built on every allowed Check, and a frozen
    dataclass's ``__init__`` costs seven times as much.
    """

    reservation_id: str
    subject: str
    org: str
    api: str
    model: str
    input_estimate: int
    output_reserved: int
    stream: bool
    # The output limit Check lowered the request to (0: none): ext_proc writes it into the
    # body, so it is signed like the rest (authz.output_cap).
    output_cap: int = 0


def reservation_org(reservation_id: str) -> str | None:
    """The org a reservation id names (``<hex>@<org>``, or ``local:<hex>@<org>``)."""
    _, at, org = reservation_id.partition("@")
    return org if at else None


def _message(h: Handle) -> bytes:
    # Lengths first: no separator a claim value could contain can shift a boundary.
    s = (
        f"{_VERSION}:{len(h.reservation_id)},{len(h.subject)},{len(h.org)},{len(h.api)},"
        f"{len(h.model)}|{h.reservation_id}{h.subject}{h.org}{h.api}{h.model}"
        f"|{h.input_estimate}|{h.output_reserved}|{int(h.stream)}"
    )
    if h.output_cap:  # one more field: a cap can be neither added nor dropped
        s += f"|{h.output_cap}"
    # surrogatepass: a lone surrogate in a JSON string must not crash the signer.
    return s.encode("utf-8", "surrogatepass")


class _Hmac:
    """HMAC-SHA256 under one key, its padded inner and outer states hashed once.

    Exactly RFC 2104; per message it costs about 1 us against 4 us for
    ``hmac.digest()``, which looks the digest up in OpenSSL on every call.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def mac(self, msg: bytes) -> str:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_BYTES].hex()


class HandleKeys:
    """Signs with one key; verifies against it and the few keys it replaced.

    Shared by the Check and the Process servicers of one process. Every replica that
    shares a ledger must sign with the same key, since Envoy may send a request's Check
    to one replica and its Process stream to another.
    """

    def __init__(self, key: bytes, source: str) -> None:
        _check_key(key)
        self._key = key
        self._hmac = _Hmac(key)
        self._old: tuple[_Hmac, ...] = ()
        self.source = source  # for the start-up log line: "file", "redis", "process"

    @classmethod
    def random(cls, source: str = "process") -> HandleKeys:
        return cls(os.urandom(MIN_KEY_BYTES), source)

    @property
    def key(self) -> bytes:
        return self._key

    def adopt(self, key: bytes, source: str) -> bool:
        """Sign with ``key`` from now on; handles signed with the old key still verify.

        True if the key changed. Used when a replica that started on a fallback key
        learns the shared one.
        """
        _check_key(key)
        self.source = source
        if hmac.compare_digest(key, self._key):
            return False
        self._old = (self._hmac, *self._old)[:_OLD_KEYS]
        self._key = key
        self._hmac = _Hmac(key)
        return True

    def sign(self, h: Handle) -> str:
        return self._hmac.mac(_message(h))

    def verify(self, h: Handle, mac: str | None) -> SettleRefusal | None:
        """None if ``h`` may be settled; otherwise why not. Constant-time in the MAC."""
        if reservation_org(h.reservation_id) != h.org:
            return SettleRefusal.ORG_MISMATCH
        if not mac:
            return SettleRefusal.UNSIGNED
        # Bytes, not str: compare_digest refuses non-ASCII str, and the MAC is the
        # caller's text.
        given = mac.encode("utf-8", "surrogatepass")
        msg = _message(h)
        for key in (self._hmac, *self._old):
            if hmac.compare_digest(key.mac(msg).encode(), given):
                return None
        return SettleRefusal.FORGED


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a handle key needs at least {MIN_KEY_BYTES} bytes (got {len(key)})")


def key_fingerprint(key: bytes) -> str:
    """A short, non-secret name for a key (start-up log), to compare replicas by."""
    return hashlib.sha256(b"authz handle key fingerprint|" + key).hexdigest()[:12]
