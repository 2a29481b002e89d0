"""Envoy ext_authz messages <-> authz values. The one place Envoy responses are built.

What Envoy does with each answer (see envoy/envoy.yaml):
- ``ok_response``: the request goes upstream with ``headers`` set and
  ``headers_to_remove`` stripped; ``response_headers_to_add`` land on the client's
  response. ``dynamic_metadata`` is stored under ``envoy.filters.http.ext_authz`` and
  forwarded to our ext_proc stream, which settles the reservation it names only if the
  ``mac`` beside it verifies (:mod:`authz.handles`).
- ``denied_response``: Envoy answers the client itself with our status, headers, body.
- An exception in the servicer (could not decide) becomes a gRPC error; Envoy then
  applies ``status_on_error`` (503 in our config) unless ``failure_mode_allow`` is set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from authz.answers import reset_header
from authz.apis import Api, api_for_path
from authz.confirm import FULL_HOLD
from authz.decision import Decision, DenyReason
from authz.enforcer import CheckInput
from authz.handles import MAC_FIELD, Handle, HandleKeys
from authz.proto import base_pb2, http_status_pb2
from authz.proto import external_auth_pb2 as authz_pb2

__all__ = ["UPSTREAM_PREFIX", "check_input", "check_response", "error_body", "metadata_fields"]

UPSTREAM_PREFIX = "x-authz-"  # headers we set upstream; clients can never set them
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_PARTIAL = "x-envoy-auth-partial-body"
_JWT_NS = "envoy.filters.http.jwt_authn"

# (OpenAI error type, Anthropic error type) per HTTP status we answer with.
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("permission_denied", "permission_error"),
    429: ("insufficient_quota", "rate_limit_error"),
    503: ("service_unavailable", "overloaded_error"),
}
_OPENAI_CODES = {
    DenyReason.UNAUTHENTICATED: "invalid_api_key",
    DenyReason.BUDGET_EXHAUSTED: "insufficient_quota",
    DenyReason.RATE_LIMITED: "rate_limit_exceeded",
    DenyReason.OFF_PEAK: "rate_limit_exceeded",
}
# A 429 that waiting can cure (a rate, peak hours) vs one it cannot before the period ends.
_RETRYABLE = {DenyReason.RATE_LIMITED, DenyReason.OFF_PEAK}


def check_input(req: authz_pb2.CheckRequest, payload_key: str) -> CheckInput:
    http = req.attributes.request.http
    headers = dict(http.headers)
    body = http.raw_body if http.raw_body else (http.body.encode() if http.body else None)
    payload: Mapping[str, Any] | None = None
    ns = req.attributes.metadata_context.filter_metadata.get(_JWT_NS)
    if ns is not None and payload_key in ns.fields:
        value = ns.fields[payload_key]
        if value.HasField("struct_value"):
            payload = json_format.MessageToDict(value.struct_value)
    return CheckInput(
        method=http.method,
        path=http.path,
        headers=headers,
        body=body,
        body_truncated=headers.get(_PARTIAL) == "true",
        envoy_jwt_payload=payload,
        # By the ext_proc stream that follows (authz.confirm), unless the caller says
        # none will (the HTTP check port).
        confirmed_later=FULL_HOLD not in req.attributes.context_extensions,
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _quota_headers(d: Decision) -> list[base_pb2.HeaderValueOption]:
    if d.quota is None:
        return []
    q = d.quota
    return [
        _header("x-ratelimit-limit-tokens", str(q.limit)),
        _header("x-ratelimit-remaining-tokens", str(q.remaining)),
        _header("x-ratelimit-reset-tokens", reset_header(q.reset_after_s)),
    ]


def metadata_fields(d: Decision, keys: HandleKeys | None = None) -> dict[str, Any]:
    """What ext_proc sees under envoy.filters.http.ext_authz (access logs: selected keys).

    A reservation comes with ``mac``, which signs every field settlement trusts
    (:mod:`authz.handles`); without ``keys`` it has none, and ext_proc will refuse it.
    """
    fields: dict[str, Any] = {"verdict": d.verdict.value}
    subject = org = ""
    if d.subject is not None:
        fields["subject"] = subject = str(d.subject)
        fields["org"] = org = d.subject.org
    if d.reason is not None:
        fields["reason"] = d.reason.value
    if d.model is not None:
        fields["model"] = d.model
    if d.api is not None:
        fields["api"] = d.api.value
    if d.reservation_id is not None:
        fields["reservation_id"] = d.reservation_id
        fields["input_estimate"] = d.input_estimate
        fields["output_reserved"] = d.output_reserved
        fields["stream"] = d.stream
        if d.output_cap is not None:
            fields["output_cap"] = d.output_cap
        if keys is not None:
            handle = Handle(
                d.reservation_id, subject, org, d.api.value if d.api else "", d.model or "",
                d.input_estimate, d.output_reserved, d.stream, d.output_cap or 0,
            )  # fmt: skip
            fields[MAC_FIELD] = keys.sign(handle)
    return fields


def _error_body(d: Decision, path: str) -> bytes:
    openai_type, anthropic_type = _ERROR_TYPES.get(d.status, ("invalid_request_error", "api_error"))
    if d.reason in _RETRYABLE:
        openai_type = "rate_limit_exceeded"
    # By path, not by d.api: a 401 is decided before the body is read.
    if (d.api or api_for_path(path)) is Api.ANTHROPIC_MESSAGES:
        return json.dumps(
            {"type": "error", "error": {"type": anthropic_type, "message": d.message}}
        ).encode()
    code = _OPENAI_CODES.get(d.reason, d.reason.value if d.reason else None) if d.reason else None
    return json.dumps(
        {"error": {"message": d.message, "type": openai_type, "code": code, "param": None}}
    ).encode()


def error_body(d: Decision, path: str) -> bytes:
    """The error body of a denial, in the API's format (ext_proc's 429s use it too)."""
    return _error_body(d, path)


def _add_header(headers: Any, key: str, value: str) -> None:
    """Append to a repeated HeaderValueOption field in place (no temporary messages)."""
    option = headers.add()
    option.header.key = key
    option.header.value = value
    option.append_action = _OVERWRITE


def _fill_metadata(meta: struct_pb2.Struct, d: Decision, keys: HandleKeys | None) -> None:
    # Assigning map entries in place is about twice as fast as Struct.update(), which
    # checks every value's type in Python and builds each Value twice (bench/micro.py).
    fields = meta.fields
    for key, value in metadata_fields(d, keys).items():
        kind = value.__class__
        if kind is str:
            fields[key].string_value = value
        elif kind is bool:
            fields[key].bool_value = value
        elif kind is int or kind is float:
            fields[key].number_value = value
        else:
            meta.update({key: value})


def _allow_response(
    d: Decision, inp: CheckInput, keys: HandleKeys | None
) -> authz_pb2.CheckResponse:
    """The allow answer, built in place: this runs on every allowed request."""
    resp = authz_pb2.CheckResponse()
    resp.status.SetInParent()  # code 0: OK
    _fill_metadata(resp.dynamic_metadata, d, keys)
    ok = resp.ok_response
    ok.SetInParent()
    ours: tuple[str, ...] = ()
    if d.subject is not None:
        _add_header(ok.headers, "x-authz-subject", str(d.subject))
        ours = ("x-authz-subject",)
    # No reservation id upstream: the upstream and its logs are outside the trust
    # boundary. Correlate with Envoy's x-request-id (in the access log) instead.
    # Anything else named like our headers was sent by the client: strip it.
    for key in inp.headers:
        if key.startswith(UPSTREAM_PREFIX) and key not in ours:
            ok.headers_to_remove.append(key)
    q = d.quota
    if q is not None:
        to_client = ok.response_headers_to_add
        _add_header(to_client, "x-ratelimit-limit-tokens", str(q.limit))
        _add_header(to_client, "x-ratelimit-remaining-tokens", str(q.remaining))
        _add_header(to_client, "x-ratelimit-reset-tokens", reset_header(q.reset_after_s))
    if d.warnings:
        _add_header(ok.response_headers_to_add, "x-authz-budget-warning", "; ".join(d.warnings))
    if d.output_cap is not None:  # admitted with its output limit lowered (authz.output_cap)
        _add_header(ok.response_headers_to_add, "x-authz-max-tokens", str(d.output_cap))
    return resp


def check_response(
    d: Decision, inp: CheckInput, keys: HandleKeys | None = None
) -> authz_pb2.CheckResponse:
    """``keys`` signs the reservation handle; without them ext_proc refuses to settle."""
    if d.allowed:
        return _allow_response(d, inp, keys)
    meta = struct_pb2.Struct()
    meta.update(metadata_fields(d))
    headers = [_header("content-type", "application/json"), *_quota_headers(d)]
    headers.append(_header("x-authz-reason", d.reason.value if d.reason else "denied"))
    if d.retry_after_s is not None:
        headers.append(_header("retry-after", str(max(1, int(d.retry_after_s + 0.999)))))
        # A period budget will not come back by retrying now: tell the SDKs not to. A
        # rate will: let them retry (they honour retry-after).
        retry = "true" if d.reason in _RETRYABLE else "false"
        headers.append(_header("x-should-retry", retry))
    denied = authz_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=d.status),  # type: ignore[arg-type]
        headers=headers,
        body=_error_body(d, inp.path).decode(),
    )
    # gRPC code 7 (PERMISSION_DENIED) marks the check as denied; the HTTP status is ours.
    return authz_pb2.CheckResponse(
        status=status_pb2.Status(code=7), denied_response=denied, dynamic_metadata=meta
    )
