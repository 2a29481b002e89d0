"""What ext_authz left in the metadata of an ext_proc stream, read without trusting it.

Envoy forwards the ext_authz namespace on every ext_proc message; anyone who reaches
the gRPC port can forge it, so the handle read here is only a claim until the servicer
verifies its MAC (:mod:`authz.handles`). With ext_authz in ``http_service`` mode the
handle arrives as one field, ``x-authz-handle`` (``dynamic_metadata_from_headers``;
:mod:`authz.handle_token`), instead of the gRPC answer's separate fields.
"""

from __future__ import annotations

from typing import Any

from authz.apis import Api
from authz.handle_token import HANDLE_HEADER, decode_token
from authz.handles import MAC_FIELD, Handle, SettleRefusal
from authz.proto import external_processor_pb2 as pb
from authz.settle import ReservationInfo

__all__ = [
    "AUTHZ_NS",
    "check_traceparent",
    "from_upstream",
    "header_map",
    "labels",
    "reservation",
    "reservation_info",
]

AUTHZ_NS = "envoy.filters.http.ext_authz"
EXT_PROC_NS = "envoy.filters.http.ext_proc"  # where Envoy puts the response attributes


def reservation(req: pb.ProcessingRequest) -> tuple[Handle, str] | SettleRefusal | None:
    """The handle ext_authz put in the metadata and its MAC, unverified; or None if
    there is no reservation (a local reply, an unbudgeted request)."""
    ns = req.metadata_context.filter_metadata.get(AUTHZ_NS)
    if ns is None:
        return None
    f = ns.fields
    if "reservation_id" not in f:
        if HANDLE_HEADER in f:  # ext_authz http_service: the whole handle in one string
            return decode_token(f[HANDLE_HEADER].string_value)
        return None
    try:
        handle = Handle(
            reservation_id=f["reservation_id"].string_value,
            subject=f["subject"].string_value if "subject" in f else "",
            org=f["org"].string_value if "org" in f else "",
            api=Api(f["api"].string_value).value,
            model=f["model"].string_value if "model" in f else "",
            input_estimate=_count(f, "input_estimate"),
            output_reserved=_count(f, "output_reserved"),
            stream=f["stream"].bool_value if "stream" in f else False,
            output_cap=_count(f, "output_cap"),
        )
    except (KeyError, ValueError, OverflowError):  # no or unknown api, a NaN estimate...
        return SettleRefusal.MALFORMED
    mac = f[MAC_FIELD].string_value if MAC_FIELD in f else ""
    return handle, mac


def from_upstream(req: pb.ProcessingRequest) -> bool:
    """False when Envoy says the response headers were not the upstream's: a filter
    after ext_authz answered locally (a guardrail), a route's ``direct_response``, or
    Envoy's own 503 for an upstream it could not reach. Read from the
    ``response.code_details`` attribute (``via_upstream`` for an upstream's answer);
    a config that does not ask for it is taken as upstream, as before.

    Issue 16: a guardrail that answers 200 with a canned message was charged the whole
    reservation (a 200 JSON without usage settles as the estimate), though no model ran.
    """
    attrs = req.attributes.get(EXT_PROC_NS)
    if attrs is None or "response.code_details" not in attrs.fields:
        return True
    details: str = attrs.fields["response.code_details"].string_value
    return details == "via_upstream"


def _count(f: Any, key: str) -> int:
    if key not in f:
        return 0
    value = f[key].number_value
    if value != int(value):  # int() raises for NaN/inf; a fraction was never ours
        raise ValueError(key)
    return int(value)


def reservation_info(h: Handle) -> ReservationInfo:
    return ReservationInfo(
        reservation_id=h.reservation_id,
        api=Api(h.api),
        input_estimate=h.input_estimate,
        output_reserved=h.output_reserved,
        org=h.org,
        model=h.model,
        output_cap=h.output_cap,
        stream=h.stream,
        subject=h.subject,
    )


def labels(req: pb.ProcessingRequest) -> tuple[str, str]:
    """(subject path, department) from what ext_authz decided, for spans and metrics."""
    ns = req.metadata_context.filter_metadata.get(AUTHZ_NS)
    if ns is None:
        return "", ""
    if "subject" in ns.fields:
        subject = ns.fields["subject"].string_value
    elif HANDLE_HEADER in ns.fields:  # http_service: the subject is inside the handle
        found = decode_token(ns.fields[HANDLE_HEADER].string_value)
        if isinstance(found, SettleRefusal):
            return "", ""
        subject = found[0].subject
    else:
        return "", ""
    for part in subject.split("/"):
        if part.startswith("department:"):
            return subject, part[len("department:") :]
    return subject, ""


def check_traceparent(req: pb.ProcessingRequest) -> str | None:
    ns = req.metadata_context.filter_metadata.get(AUTHZ_NS)
    if ns is None or "traceparent" not in ns.fields:
        return None
    return ns.fields["traceparent"].string_value or None


def header_map(msg: pb.HttpHeaders) -> dict[str, str]:
    out = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out
