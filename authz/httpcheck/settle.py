"""``POST /settle``: a gateway without ext_proc hands over the upstream's answer.

The gateway (Kong's plugin, from its log phase) sends what it copied of the upstream
response and the handle the Check gave it. The same code as an ext_proc stream then
settles it: :class:`authz.settle.ResponseTracker` reads the usage (JSON or SSE, bounded
decoding, usage bounds), and the ext_proc servicer's settlement charges the ledger,
counts and audits it. Request headers:

- ``x-authz-handle``: the signed handle (required). A MAC that does not verify is
  ``403``, counted in ``authz_settle_refused_total{reason}`` like a forged ext_proc
  stream, and charges nothing; a handle that is not ours at all is ``400`` (counted as
  ``malformed``).
- ``x-authz-upstream-status``: the upstream's HTTP status (required). Non-2xx releases.
- ``x-authz-upstream-content-type``, ``x-authz-upstream-content-encoding``: as the
  upstream sent them (content-type picks JSON or SSE; gzip/deflate are decoded).
- ``x-authz-complete``: ``true`` when the client got the whole response, ``false`` when
  the client went away or the stream was cut: then the abort rule applies (charged
  from what was seen, never zero).
- ``x-authz-truncated: true``: the gateway stopped copying at its limit: the
  reservation is charged, as for a body too big to decode.

Replays are harmless: the ledger settles a reservation once (a second settle is counted
as ``duplicate`` and charges nothing), and the answer is ``204`` both times.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from authz.envoy.stream_metadata import reservation_info
from authz.handle_token import HANDLE_HEADER, decode_token
from authz.handles import HandleKeys, SettleRefusal
from authz.policy.bounds import BoundsSettings
from authz.settle import Outcome, ReservationInfo, ResponseTracker

__all__ = ["BadSettle", "SettleRequest", "Verified", "outcome_of", "parse_settle", "verify"]

log = logging.getLogger("authz.settle")


class BadSettle(Exception):
    """A settle request that cannot be read (400); the message says which header."""


@dataclass(frozen=True, slots=True)
class SettleRequest:
    token: str
    status: int
    content_type: str
    content_encoding: str
    complete: bool
    truncated: bool


def _flag(headers: Mapping[str, str], name: str, default: bool | None) -> bool:
    value = headers.get(name)
    if value is None:
        if default is None:
            raise BadSettle(f"{name} is required (true or false)")
        return default
    v = value.strip().lower()
    if v not in ("true", "false"):
        raise BadSettle(f"{name} must be true or false (got {value[:20]!r})")
    return v == "true"


def parse_settle(headers: Mapping[str, str]) -> SettleRequest:
    """The settle request's headers, checked; :class:`BadSettle` names the bad one."""
    token = headers.get(HANDLE_HEADER, "").strip()
    if not token:
        raise BadSettle(f"{HANDLE_HEADER} is required")
    raw = headers.get("x-authz-upstream-status", "").strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) == 3):
        raise BadSettle(f"x-authz-upstream-status must be an HTTP status (got {raw[:20]!r})")
    return SettleRequest(
        token=token,
        status=int(raw),
        content_type=headers.get("x-authz-upstream-content-type", ""),
        content_encoding=headers.get("x-authz-upstream-content-encoding", ""),
        complete=_flag(headers, "x-authz-complete", None),
        truncated=_flag(headers, "x-authz-truncated", False),
    )


@dataclass(frozen=True, slots=True)
class Verified:
    info: ReservationInfo
    department: str  # the metrics' label, from the signed subject


def verify(token: str, keys: HandleKeys) -> Verified | SettleRefusal:
    """The reservation ``token`` may settle, or why not (nothing is settled then)."""
    found = decode_token(token)
    if isinstance(found, SettleRefusal):
        return found
    handle, mac = found
    refusal = keys.verify(handle, mac)
    if refusal is not None:
        return refusal
    department = ""
    for part in handle.subject.split("/"):
        if part.startswith("department:"):
            department = part[len("department:") :]
    return Verified(reservation_info(handle), department)


async def outcome_of(
    info: ReservationInfo, req: SettleRequest, body: bytes, bounds: BoundsSettings
) -> Outcome:
    """What the response cost, by ext_proc's rules (authz/settle.py)."""
    tracker = ResponseTracker(info, bounds)
    tracker.on_headers(req.status, req.content_type, req.content_encoding)
    if tracker.outcome is None:  # a body to read
        await tracker.feed(body, req.complete and not req.truncated)
        if req.truncated:
            tracker.copy_truncated()
        elif not req.complete:
            tracker.on_abort()
    assert tracker.outcome is not None
    return await tracker.outcome.resolved()
