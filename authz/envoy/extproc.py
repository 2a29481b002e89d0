"""The ext_proc gRPC servicer: one bidirectional stream per HTTP request.

Envoy opens the stream at the request body (request headers are skipped), then sends
the upstream's response headers and body. We answer every message with exactly one
response of the matching kind (an empty one means "continue"), decide per response
whether its body is buffered (JSON) or streamed (SSE), and settle the reservation
that ext_authz put in the forwarded metadata. Settlement runs in a background task so
the client's last chunk is never held up by the ledger, and so a cancelled stream (the
client went away) still gets charged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.trace import Span

from authz.apis import Api
from authz.enforcer import Enforcer
from authz.estimate import with_include_usage
from authz.policy.model import Policy
from authz.settle import BodyMode, Outcome, ReservationInfo, ResponseTracker
from authz.telemetry.metrics import Metrics
from authz.telemetry.tracing import Tracing

__all__ = ["ExternalProcessorServicer"]

log = logging.getLogger("authz.settle")
_AUTHZ_NS = "envoy.filters.http.ext_authz"
_USAGE_NS = "authz.usage"
_MODES = {
    BodyMode.NONE: processing_mode_pb2.ProcessingMode.NONE,
    BodyMode.BUFFERED: processing_mode_pb2.ProcessingMode.BUFFERED,
    BodyMode.STREAMED: processing_mode_pb2.ProcessingMode.STREAMED,
}
_CONTINUE_BODY = pb.BodyResponse()
_STREAMABLE = (Api.OPENAI_CHAT, Api.OPENAI_COMPLETIONS)


def _reservation(req: pb.ProcessingRequest) -> ReservationInfo | None:
    ns = req.metadata_context.filter_metadata.get(_AUTHZ_NS)
    if ns is None or "reservation_id" not in ns.fields:
        return None
    f = ns.fields
    try:
        api = Api(f["api"].string_value)
    except (KeyError, ValueError):
        return None
    return ReservationInfo(
        reservation_id=f["reservation_id"].string_value,
        api=api,
        input_estimate=int(f["input_estimate"].number_value) if "input_estimate" in f else 0,
        output_reserved=int(f["output_reserved"].number_value) if "output_reserved" in f else 0,
        org=f["org"].string_value if "org" in f else "",
        model=f["model"].string_value if "model" in f else "",
    )


def _labels(req: pb.ProcessingRequest) -> tuple[str, str]:
    """(subject path, department) from what ext_authz decided, for spans and metrics."""
    ns = req.metadata_context.filter_metadata.get(_AUTHZ_NS)
    if ns is None or "subject" not in ns.fields:
        return "", ""
    subject = ns.fields["subject"].string_value
    for part in subject.split("/"):
        if part.startswith("department:"):
            return subject, part[len("department:") :]
    return subject, ""


def _check_traceparent(req: pb.ProcessingRequest) -> str | None:
    ns = req.metadata_context.filter_metadata.get(_AUTHZ_NS)
    if ns is None or "traceparent" not in ns.fields:
        return None
    return ns.fields["traceparent"].string_value or None


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


class ExternalProcessorServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self, enforcer: Enforcer, metrics: Metrics, tracing: Tracing | None = None
    ) -> None:
        self._enforcer = enforcer
        self._metrics = metrics
        self._tracing = tracing  # None: tracing is off and nothing of it runs here
        self._pending: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait for settlements in flight (graceful stop)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _settle_later(
        self, info: ReservationInfo, outcome: Outcome, department: str, span: Span | None
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._settle(info, outcome, department, span)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(
        self, info: ReservationInfo, outcome: Outcome, department: str, span: Span | None
    ) -> None:
        if span is None:
            await self._settle_now(info, outcome, department, None)
            return
        # The ledger's settle span becomes a child of the stream's span.
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            await self._settle_now(info, outcome, department, span)

    async def _settle_now(
        self, info: ReservationInfo, outcome: Outcome, department: str, span: Span | None
    ) -> None:
        start = time.perf_counter()
        try:
            if outcome.kind == "released":
                done = await self._enforcer.release(info.reservation_id)
                self._metrics.settled("released")
            else:
                done = await self._enforcer.settle(info.reservation_id, outcome.usage)
                policy = self._enforcer.policy
                label = policy.models.label(info.model or None)
                self._metrics.settled(
                    outcome.kind if done else "duplicate",
                    info.org,
                    label,
                    outcome.usage if done else None,
                    department,
                    _cost(policy, info.model, outcome) if done else None,
                )
            self._metrics.settle_seconds.observe(time.perf_counter() - start)
            if span is not None:
                Tracing.settled(span, outcome.kind, outcome.usage, done)
        except Exception as exc:  # a settle failure must never break the client's response
            log.exception("settlement of %s failed", info.reservation_id)
            self._metrics.settled("failed")
            if span is not None:
                Tracing.failed(span, exc)

    def _request_body(
        self, req: pb.ProcessingRequest, info: ReservationInfo | None
    ) -> pb.ProcessingResponse:
        body = req.request_body.body
        if (
            info is None
            or info.api not in _STREAMABLE
            or not self._enforcer.policy.requests.add_stream_usage
        ):
            return pb.ProcessingResponse(request_body=_CONTINUE_BODY)
        rewritten = with_include_usage(body)
        if rewritten is None:
            return pb.ProcessingResponse(request_body=_CONTINUE_BODY)
        # Ask for the final usage chunk so a streamed answer settles exactly. In
        # BUFFERED mode with headers skipped Envoy drops content-length and re-frames.
        mutation = pb.CommonResponse(body_mutation=pb.BodyMutation(body=rewritten))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=mutation))

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        info: ReservationInfo | None = None
        tracker: ResponseTracker | None = None
        finished = False
        department = ""
        span: Span | None = None
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if info is None:
                    info = _reservation(req)
                    if info is not None:
                        subject, department = _labels(req)
                        if self._tracing is not None and span is None:
                            span = self._start_span(context, req, info, subject)
                if kind == "request_body":
                    yield self._request_body(req, info)
                elif kind == "response_headers":
                    yield self._on_headers(
                        req, info, tracker := ResponseTracker(info) if info else None
                    )
                    if tracker is not None and tracker.outcome is not None:
                        self._settle_later(tracker.info, tracker.outcome, department, span)
                        finished = True
                elif kind == "response_body":
                    resp = pb.ProcessingResponse(response_body=_CONTINUE_BODY)
                    if tracker is not None and not finished:
                        outcome = tracker.on_body(
                            req.response_body.body, req.response_body.end_of_stream
                        )
                        if outcome is not None:
                            finished = True
                            self._settle_later(tracker.info, outcome, department, span)
                            resp.dynamic_metadata.CopyFrom(_usage_metadata(outcome))
                    yield resp
                else:
                    yield _continue(kind)
        finally:
            # The stream closed (or was cancelled) without a complete response.
            if info is not None and not finished:
                tracker = tracker or ResponseTracker(info)
                self._settle_later(info, tracker.on_abort(), department, span)

    def _start_span(
        self,
        context: grpc.aio.ServicerContext,
        req: pb.ProcessingRequest,
        info: ReservationInfo,
        subject: str,
    ) -> Span:
        assert self._tracing is not None
        span = self._tracing.start_stream(context.invocation_metadata(), _check_traceparent(req))
        Tracing.stream_info(span, info.reservation_id, subject, info.model, info.api.value)
        return span

    def _on_headers(
        self,
        req: pb.ProcessingRequest,
        info: ReservationInfo | None,
        tracker: ResponseTracker | None,
    ) -> pb.ProcessingResponse:
        if tracker is None:
            mode = BodyMode.NONE
        else:
            h = _headers(req.response_headers)
            try:
                status = int(h.get(":status", "0"))
            except ValueError:
                status = 0
            mode = tracker.on_headers(
                status, h.get("content-type", ""), h.get("content-encoding", "")
            )
        override = processing_mode_pb2.ProcessingMode(response_body_mode=_MODES[mode])
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=override)


def _cost(policy: Policy, model: str, outcome: Outcome) -> tuple[float, str] | None:
    """What the usage cost at the policy's prices, or None for a model without one."""
    price = policy.pricing.for_model(model or None)
    if price is None:
        return None
    u = outcome.usage
    micros = (
        u.input_tokens * price.input
        + u.cached_input_tokens * price.cached_input
        + u.output_tokens * price.output
    )
    return micros / 1_000_000, policy.pricing.currency


def _usage_metadata(outcome: Outcome) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    u = outcome.usage
    fields: dict[str, Any] = {
        "kind": outcome.kind,
        "input": u.input_tokens,
        "cached_input": u.cached_input_tokens,
        "output": u.output_tokens,
    }
    s.update({_USAGE_NS: fields})
    return s


def _continue(kind: str | None) -> pb.ProcessingResponse:
    if kind == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    if kind == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if kind == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(request_body=_CONTINUE_BODY)
