"""The HTTP filters that put the service in Envoy's request path, as typed messages.

ext_authz asks the service before the request goes upstream (gRPC Check, or the HTTP
check API in ``http_service`` mode); ext_proc streams the response to it so it can
settle what was reserved; jwt_authn, when Envoy verifies JWTs, sits in front. Each
builder returns the ``HttpFilter`` and the comments that explain its settings (paths
relative to the filter, see :mod:`authz.envoyconf.yaml_out`).
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HttpUri,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationResponse,
    BufferSettings,
    ExtAuthz,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any

from authz.envoyconf.clusters import AUTHZ, AUTHZ_HTTP
from authz.envoyconf.options import Options
from authz.envoyconf.yaml_out import Notes

__all__ = ["EXT_AUTHZ", "EXT_PROC", "JWT_AUTHN", "ext_authz", "ext_proc", "router"]

EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
JWT_AUTHN = "envoy.filters.http.jwt_authn"
HANDLE_HEADER = "x-authz-handle"  # the HTTP check API's reservation handle (shared contract)


def _match(*exact: str, prefix: tuple[str, ...] = ()) -> ListStringMatcher:
    patterns = [StringMatcher(exact=e) for e in exact]
    patterns += [StringMatcher(prefix=p) for p in prefix]
    return ListStringMatcher(patterns=patterns)


def _filter(name: str, config: object) -> HttpFilter:
    return HttpFilter(name=name, typed_config=Any.pack(config))  # type: ignore[arg-type]


def router() -> HttpFilter:
    return _filter("envoy.filters.http.router", Router())


def ext_authz(opts: Options) -> tuple[HttpFilter, Notes]:
    http = "http_service" in opts.modes
    config = ExtAuthz(
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        with_request_body=BufferSettings(
            max_request_bytes=1048576, allow_partial_message=True, pack_as_bytes=not http
        ),
        allowed_headers=_match(
            "authorization", "x-api-key", "api-key", "content-type", "traceparent", "tracestate",
            # gRPC carries these as attributes or adds them itself; HTTP only as headers
            # that pass this list (the partial flag marks a body truncated at the limit).
            *(["x-request-id", "x-envoy-auth-partial-body"] if http else []),
            prefix=("x-authz-",),
        ),
        emit_filter_state_stats=True,
        clear_route_cache=False,
    )  # fmt: skip
    notes = dict(_AUTHZ_NOTES)
    if http:
        scheme = "https" if "mtls" in opts.modes else "http"
        host, port = opts.check_http_address
        config.http_service = HttpService(
            server_uri=HttpUri(
                uri=f"{scheme}://{host}:{port}", cluster=AUTHZ_HTTP, timeout=opts.authz_timeout
            ),
            path_prefix="/check",
            authorization_response=AuthorizationResponse(
                allowed_upstream_headers=_match("x-authz-subject"),
                allowed_client_headers=_match(
                    "content-type", "retry-after", "x-should-retry", "x-authz-reason",
                    prefix=("x-ratelimit-",),
                ),
                allowed_client_headers_on_success=_match(
                    "x-authz-budget-warning", "x-authz-max-tokens", prefix=("x-ratelimit-",)
                ),
                dynamic_metadata_from_headers=_match(HANDLE_HEADER),
            ),
        )  # fmt: skip
        notes.update(_HTTP_NOTES)
        notes["typed_config.with_request_body"] = _BODY_NOTE.rsplit(";", 1)[0] + "."
    else:
        config.grpc_service = GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ), timeout=opts.authz_timeout
        )
        config.metadata_context_namespaces = [JWT_AUTHN]
        notes["typed_config.grpc_service.timeout"] = _TIMEOUT_NOTE
    return _filter(EXT_AUTHZ, config), notes


def ext_proc(opts: Options) -> tuple[HttpFilter, Notes]:
    config = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ)),
        failure_mode_allow=True,
        message_timeout=opts.message_timeout,
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingModeHeaderSendMode.SKIP,
            request_body_mode=ProcessingModeBodySendMode.BUFFERED,
            response_header_mode=ProcessingModeHeaderSendMode.SEND,
            response_body_mode=ProcessingModeBodySendMode.STREAMED,
            response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        ),
        allow_mode_override=True,
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_AUTHZ]),
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=["authz.usage"]),
        ),
        response_attributes=["response.code", "response.code_details"],
    )
    return _filter(EXT_PROC, config), dict(_PROC_NOTES)


_TIMEOUT_NOTE = """\
Every request waits for this answer, but it is a ceiling, not the
expected time (a check takes ~1 ms). A service that is down fails at
once (connect refused); only a hung one holds a client this long. On a
CPU-starved host (a throttled pod, a busy node, a GC pause) an answer
can take several hundred ms, and the old 250 ms turned those into 503s
for requests the service was about to allow (issue 10). Keep it above
ledger.breaker.call_timeout_s and queue.max_wait_s (check-config warns)."""

_BODY_NOTE = """\
The service estimates the worst-case cost from the body (model, prompt
size, max_tokens). A body over 1 MiB is sent truncated (and flagged with
the header x-envoy-auth-partial-body: true) rather than refused;
pack_as_bytes keeps it as raw bytes (no UTF-8 re-encoding)."""

_AUTHZ_NOTES: Notes = {
    "typed_config.failure_mode_allow": (
        "Fail closed: without an answer nobody's budget is enforced."
    ),
    "typed_config.status_on_error": """\
Clients get a retryable 503 rather than Envoy's default 403, which reads
as "forbidden".""",
    "typed_config.with_request_body": _BODY_NOTE,
    "typed_config.clear_route_cache": (
        "Headers the service adds do not change routing: one route, no re-match."
    ),
    "typed_config.metadata_context_namespaces": """\
Harmless without jwt_authn (the namespace is then empty); with it, the
service gets the verified JWT claims.""",
    "typed_config.allowed_headers": """\
Send only what identifies the caller and traces the call, not every
header. x-authz-* is included so the service can see, and strip,
headers a client forged in the namespace the service writes upstream.""",
    "typed_config.emit_filter_state_stats": (
        "Exposes the check latency to the access log (its authz_us field)."
    ),
}

_HTTP_NOTES: Notes = {
    "typed_config.http_service": """\
The service's HTTP check API (authz serve --check-http-address): Envoy sends
the request's method and allowed headers (and body) to /check/<path>; 200
allows, anything else is the answer the client gets.""",
    "typed_config.http_service.server_uri.timeout": _TIMEOUT_NOTE,
    "typed_config.http_service.authorization_response.allowed_upstream_headers": (
        "What an allow adds upstream. Never the handle: it is for ext_proc only."
    ),
    "typed_config.http_service.authorization_response.allowed_client_headers": (
        "What a denial shows the client: the OpenAI-style error and when to retry."
    ),
    "typed_config.http_service.authorization_response.allowed_client_headers_on_success": (
        "Quota headers on the client's response to an allowed request."
    ),
    "typed_config.http_service.authorization_response.dynamic_metadata_from_headers": """\
The reservation handle becomes metadata in the ext_authz namespace, which
ext_proc forwards to the service so it knows what to settle.""",
}

_PROC_NOTES: Notes = {
    "typed_config.failure_mode_allow": """\
Fail open: at this point the request is already paid for (reserved).
A settle error must not break a user's answer; a reservation that is
never settled is the service's to expire, not the client's problem.""",
    "typed_config.message_timeout": """\
Per message. Each streamed chunk waits for the service's reply, so this
bounds the delay a slow service can add to a chunk. Past it Envoy stops
sending this response to the service (fail open): the rest of the
stream, its usage included, is never seen, and the settlement becomes
an estimate. 0.5 s was passed on a loaded 2-core machine (issue 10 #3:
totals drifted); a healthy service answers in ms, and a hung one costs
a request this once (ext_proc is then off for that stream).""",
    "typed_config.processing_mode.request_header_mode": (
        "Headers carry nothing the service needs here; ext_authz saw them already."
    ),
    "typed_config.processing_mode.request_body_mode": """\
Whole request body, once, so the service can add
stream_options.include_usage to streaming OpenAI requests; without it
OpenAI does not report usage on a stream. Because the body may change,
Envoy sends every request body upstream chunked, without content-length.""",
    "typed_config.processing_mode.response_header_mode": (
        "Response status and content-type decide how the body is read."
    ),
    "typed_config.processing_mode.response_body_mode": """\
Streamed, so SSE reaches the client chunk by chunk; for plain JSON the
service switches itself to BUFFERED (allow_mode_override below).""",
    "typed_config.metadata_options.forwarding_namespaces": """\
Gives the service, on every message, what ext_authz decided
(e.g. the reservation id) so it knows what to settle.""",
    "typed_config.metadata_options.receiving_namespaces": """\
The only namespace the service may write back: the usage it measured,
shown in the access log.""",
    "typed_config.response_attributes": (
        "A non-2xx upstream answer reports no usage, and an answer not from the\n"
        "upstream (code_details other than via_upstream: a guardrail, a\n"
        "direct_response, Envoy's 503) used no model: the service releases both."
    ),
}
