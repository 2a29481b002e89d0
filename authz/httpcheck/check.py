"""Envoy's ext_authz HTTP service protocol <-> the gRPC Check's messages.

The HTTP Check decides nothing itself: it turns the gateway's request into the
``CheckRequest`` Envoy would have sent over gRPC, runs the gRPC servicer's own ``Check``
on it (the same enforcer, metrics, decision log, tracing, and release of answers
nobody received: authz/envoy/unanswered.py), and turns the ``CheckResponse`` back into
the HTTP answer Envoy's ``http_service`` mode (and the Kong plugin) reads:

- allow: ``200``, every header the gRPC answer sets, each on its own line:
  ``x-authz-subject`` (for the upstream: ``allowed_upstream_headers``),
  ``x-ratelimit-*-tokens``, ``x-authz-budget-warning``, ``x-authz-max-tokens`` (for the
  client: ``allowed_client_headers_on_success``), ``x-envoy-auth-headers-to-remove``
  (the client's own ``x-authz-*`` headers, which Envoy strips before the upstream),
  and ``x-authz-handle``, the signed reservation (:mod:`authz.handle_token`), which
  goes to ext_proc or Kong's settle call and nowhere else.
- deny: the denial's status, headers and body, exactly as the gRPC ``DeniedHttpResponse``.
  Envoy reads any 5xx from an HTTP authz server as an error (``status_on_error``), so
  a 503 denial (the ledger unreachable, fail_closed) reaches Envoy's clients as its
  ``status_on_error`` without our body; Kong passes it on as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from authz.confirm import FULL_HOLD
from authz.handle_token import HANDLE_HEADER, encode_token
from authz.handles import MAC_FIELD, Handle
from authz.proto import external_auth_pb2 as authz_pb2

__all__ = ["CHECK_PREFIX", "REMOVE_HEADER", "HttpAnswer", "check_request", "http_answer"]

CHECK_PREFIX = "/check"  # Envoy's http_service path_prefix: /check/<original path>
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# Not the client's: set by the transport between the gateway and us.
_SKIP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "expect"})

HttpAnswer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body


def original_path(raw_path: str) -> str | None:
    """The client's path from ``/check/<path>``; None if the prefix is not there."""
    if raw_path == CHECK_PREFIX:
        return "/"
    if raw_path.startswith(CHECK_PREFIX + "/") or raw_path.startswith(CHECK_PREFIX + "?"):
        rest = raw_path[len(CHECK_PREFIX) :]
        return rest if rest.startswith("/") else "/" + rest
    return None


def check_request(
    method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes | None
) -> authz_pb2.CheckRequest:
    """The CheckRequest Envoy's gRPC mode would send for this request.

    Repeated headers are joined with ``,`` as Envoy joins them for gRPC. The body goes
    in ``raw_body`` (``pack_as_bytes``); Envoy's ``x-envoy-auth-partial-body`` header
    says, as over gRPC, that it was cut at ``max_request_bytes``.
    """
    req = authz_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = method
    http.path = path
    merged: dict[str, str] = {}
    for key, value in headers:
        k = key.lower()
        if k in _SKIP:
            continue
        merged[k] = f"{merged[k]},{value}" if k in merged else value
    http.headers.update(merged)
    if body:
        http.raw_body = body
    # No ext_proc stream confirms a hold made here (Kong settles over HTTP when the
    # response ends): the hold lives ttl_s at once (authz.confirm).
    req.attributes.context_extensions[FULL_HOLD] = "1"
    return req


_Meta = Mapping[str, str | float | bool]


def _token(f: _Meta) -> str | None:
    """The signed handle of an allowing answer's metadata, or None without a reservation."""
    if "reservation_id" not in f or MAC_FIELD not in f:
        return None
    handle = Handle(
        str(f["reservation_id"]), str(f.get("subject", "")), str(f.get("org", "")),
        str(f.get("api", "")), str(f.get("model", "")), int(f.get("input_estimate", 0)),
        int(f.get("output_reserved", 0)), bool(f.get("stream", False)), int(f.get("output_cap", 0)),
    )  # fmt: skip
    return encode_token(handle, str(f[MAC_FIELD]))


def _metadata(resp: authz_pb2.CheckResponse) -> dict[str, str | float | bool]:
    out: dict[str, str | float | bool] = {}
    for key, value in resp.dynamic_metadata.fields.items():
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            out[key] = value.string_value
        elif kind == "number_value":
            out[key] = value.number_value
        elif kind == "bool_value":
            out[key] = value.bool_value
    return out


def http_answer(resp: authz_pb2.CheckResponse) -> HttpAnswer:
    """The HTTP answer for a CheckResponse (see the module docstring)."""
    if resp.HasField("denied_response"):
        denied = resp.denied_response
        headers = [(h.header.key, h.header.value) for h in denied.headers]
        return int(denied.status.code) or 403, headers, denied.body.encode()
    ok = resp.ok_response
    headers = [(h.header.key, h.header.value) for h in ok.headers]
    headers += [(h.header.key, h.header.value) for h in ok.response_headers_to_add]
    if ok.headers_to_remove:
        headers.append((REMOVE_HEADER, ",".join(ok.headers_to_remove)))
    token = _token(_metadata(resp))
    if token is not None:
        headers.append((HANDLE_HEADER, token))
    return 200, headers, b""
