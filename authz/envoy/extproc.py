"""The ext_proc gRPC servicer: one bidirectional stream per HTTP request.

Envoy opens the stream at the request body (request headers are skipped), then sends
the upstream's response headers and body. We answer every message with exactly one
response of the matching kind (an empty one means "continue"), decide per response
whether its body is buffered (JSON) or streamed (SSE), and settle the reservation
that ext_authz put in the forwarded metadata. Settlement runs in a background task so
the client's last chunk is never held up by the ledger, and so a cancelled stream (the
client went away) still gets charged.

Anyone who reaches the gRPC port can open a stream, so the metadata is not trusted as
such: a reservation settles (or is released) only if the MAC Check put beside it
verifies (:mod:`authz.handles`). Otherwise the stream passes through untouched, the
refusal is counted (``authz_settle_refused_total``) and logged, and the reservation
waits for its genuine settlement, or for expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span

from authz.enforcer import Enforcer
from authz.envoy.stream_metadata import (
    AUTHZ_NS,
    check_traceparent,
    from_upstream,
    header_map,
    labels,
    reservation,
    reservation_info,
)
from authz.envoy.stream_replies import (
    continue_message,
    settled_cost,
    uncapped_refusal,
    usage_metadata,
)
from authz.handles import HandleKeys, SettleRefusal
from authz.mutate.request import USAGE_APIS, CapUnwritable, RequestChanges, rewrite_request
from authz.mutate.response import UsageChunkRemover, usage_remover
from authz.offload import INLINE_BYTES, run_off_loop
from authz.proto import external_processor_pb2 as pb
from authz.proto import external_processor_pb2_grpc as pb_grpc
from authz.proto import processing_mode_pb2
from authz.settle import BodyMode, Outcome, ReservationInfo, ResponseTracker
from authz.telemetry.metrics import Metrics
from authz.telemetry.tracing import Tracing

__all__ = ["ExternalProcessorServicer"]

log = logging.getLogger("authz.settle")
_MODES = {
    BodyMode.NONE: processing_mode_pb2.ProcessingMode.NONE,
    BodyMode.BUFFERED: processing_mode_pb2.ProcessingMode.BUFFERED,
    BodyMode.STREAMED: processing_mode_pb2.ProcessingMode.STREAMED,
}
_CONTINUE_BODY = pb.BodyResponse()
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_STREAMABLE = USAGE_APIS


class ExternalProcessorServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        enforcer: Enforcer,
        metrics: Metrics,
        tracing: Tracing | None = None,
        *,
        handles: HandleKeys,
    ) -> None:
        self._enforcer = enforcer
        self._handles = handles  # verifies what Check signed: nothing else settles
        self._metrics = metrics
        self._tracing = tracing  # None: tracing is off and nothing of it runs here
        self._pending: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait for settlements in flight (graceful stop)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _verified(
        self, req: pb.ProcessingRequest, context: grpc.aio.ServicerContext | None
    ) -> ReservationInfo | SettleRefusal | None:
        """The reservation this stream may settle; a SettleRefusal (counted, logged) if its
        handle does not verify: then nothing is settled or released."""
        found = reservation(req)
        if found is None:
            return None
        if isinstance(found, SettleRefusal):
            why = found
        else:
            handle, mac = found
            refusal = self._handles.verify(handle, mac)
            if refusal is None:
                return reservation_info(handle)
            why = refusal
        self._metrics.settle_refused.labels(why.value).inc()
        ns = req.metadata_context.filter_metadata[AUTHZ_NS].fields
        # Never the MAC or the key; the id and org as claimed (bounded), and the peer,
        # to find the caller.
        log.warning(
            "settlement refused: the reservation handle does not verify",
            extra={
                "reason": why.value,
                "reservation": ns["reservation_id"].string_value[:80]
                if "reservation_id" in ns
                else "",
                "org": ns["org"].string_value[:80] if "org" in ns else "",
                "peer": context.peer() if context is not None else "",
            },
        )
        return why

    def _confirm_later(self, info: ReservationInfo) -> None:
        """Keep the Check's tentative hold for ``ttl_s`` (authz.confirm), in a task so
        the request is not held up; a settle may overtake it (then it is a no-op)."""
        task = asyncio.get_running_loop().create_task(self._confirm(info))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _confirm(self, info: ReservationInfo) -> None:
        try:
            await self._enforcer.confirm(
                info.reservation_id, info.input_estimate, info.output_reserved
            )
        except Exception:  # unconfirmed, the settle still corrects it as a late one
            log.exception("confirmation of %s failed", info.reservation_id)

    def _settle_later(
        self, info: ReservationInfo, outcome: Outcome, department: str, span: Span | None
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(info, outcome, department, span))
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

    async def settle_outcome(
        self, info: ReservationInfo, outcome: Outcome, department: str = ""
    ) -> bool:
        """Settle now, as a stream does: the HTTP settle endpoint's way in
        (authz/httpcheck). False if the settlement failed (logged and counted)."""
        return await self._settle_now(info, outcome, department, None)

    async def _settle_now(
        self, info: ReservationInfo, outcome: Outcome, department: str, span: Span | None
    ) -> bool:
        start = time.perf_counter()
        try:
            outcome = await outcome.resolved()  # a big JSON body is parsed by now
            if outcome.kind == "released":
                done = await self._enforcer.release(info.reservation_id)
                self._metrics.settled("released")
            else:
                done = await self._enforcer.settle(info.reservation_id, outcome.usage)
                if done:  # cost budgets: what the provider bills beyond the base rates
                    await self._enforcer.settle_price(
                        info.reservation_id, info.subject, info.model, outcome.usage
                    )
                policy = self._enforcer.policy
                label = policy.models.label(info.model or None)
                self._metrics.settled(
                    outcome.kind if done else "duplicate",
                    info.org,
                    label,
                    outcome.usage if done else None,
                    department,
                    settled_cost(policy, info.model, outcome) if done else None,
                )
            if outcome.bound is not None:  # not what the upstream said: count, log, audit
                self._metrics.settlement_bounds.labels(outcome.bound.reason).inc()
                self._enforcer.bounded(outcome.bound)
            self._metrics.settle_seconds.observe(time.perf_counter() - start)
            if span is not None:
                Tracing.settled(span, outcome.kind, outcome.usage, done)
        except Exception as exc:  # a settle failure must never break the client's response
            log.exception("settlement of %s failed", info.reservation_id)
            self._metrics.settled("failed")
            if span is not None:
                Tracing.failed(span, exc)
            return False
        return True

    async def release_uncapped(self, info: ReservationInfo) -> None:
        """Give back the reservation of a request refused because its output cap could
        not be written (here, or by the HTTP check for a gateway: authz/httpcheck)."""
        try:
            await self._enforcer.release(info.reservation_id)
            self._metrics.settled("released")
        except Exception:  # the 429 goes out regardless; the reservation expires
            log.exception("release of %s failed", info.reservation_id)
            self._metrics.settled("failed")

    async def _request_body(
        self, req: pb.ProcessingRequest, info: ReservationInfo | None, changes: RequestChanges
    ) -> pb.ProcessingResponse:
        """The request body, rewritten if the service needs to; ``changes`` records what
        was changed, for the response phase."""
        body = req.request_body.body
        if info is None:
            return pb.ProcessingResponse(request_body=_CONTINUE_BODY)
        # Ask for the final usage chunk so a streamed answer settles exactly; write the
        # output limit Check lowered the request to (signed in the handle), if any.
        add_usage = info.api in _STREAMABLE and self._enforcer.policy.requests.add_stream_usage
        cap = info.output_cap or None
        try:
            # Parsed and re-encoded: a big body off the event loop (authz.offload).
            if len(body) <= INLINE_BYTES:
                rewritten = rewrite_request(body, info.api, changes, add_usage=add_usage, cap=cap)
            else:
                rewritten = await run_off_loop(
                    rewrite_request, body, info.api, changes, add_usage=add_usage, cap=cap
                )
        except CapUnwritable:
            # Never upstream uncapped: it could spend past the hard budget. Refuse and
            # give the reservation back (nothing reached the model).
            changes.refused = True
            await self.release_uncapped(info)
            return uncapped_refusal(info)
        if rewritten is None:
            return pb.ProcessingResponse(request_body=_CONTINUE_BODY)
        # In BUFFERED mode with headers skipped Envoy drops content-length and re-frames.
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
        refused = False  # a handle that did not verify: pass the stream through, once
        department = ""
        span: Span | None = None
        changes = RequestChanges()
        undo: UsageChunkRemover | None = None  # takes out what the request change caused
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if info is None and not refused:
                    found = self._verified(req, context)
                    refused = isinstance(found, SettleRefusal)
                    info = None if isinstance(found, SettleRefusal) else found
                    if info is not None:
                        self._confirm_later(info)  # Envoy used the Check's answer
                        subject, department = labels(req)
                        if self._tracing is not None and span is None:
                            span = self._start_span(context, req, info, subject)
                if kind == "request_body":
                    yield await self._request_body(req, info, changes)
                    finished = finished or changes.refused  # released: nothing to settle
                elif kind == "response_headers":
                    bounds = self._enforcer.policy.bounds
                    resp = self._on_headers(
                        req, info, tracker := ResponseTracker(info, bounds) if info else None
                    )
                    if info is not None and resp.mode_override.response_body_mode == _STREAMED:
                        encoding = header_map(req.response_headers).get("content-encoding", "")
                        undo = usage_remover(info.api, changes, encoding)
                    yield resp
                    if tracker is not None and tracker.outcome is not None:
                        self._settle_later(tracker.info, tracker.outcome, department, span)
                        finished = True
                elif kind == "response_body":
                    resp = pb.ProcessingResponse(response_body=_CONTINUE_BODY)
                    body, end = req.response_body.body, req.response_body.end_of_stream
                    if undo is not None:  # what the client sees; settled from ``body``
                        sent = undo.feed(body, end)
                        if sent is not body:  # Envoy sends these bytes instead, b"" too
                            resp.response_body.response.body_mutation.body = sent
                    if tracker is not None and not finished:
                        outcome = await tracker.feed(body, end)  # bounded decode, yields
                        if outcome is not None:
                            finished = True
                            self._settle_later(tracker.info, outcome, department, span)
                            if outcome.later is None:  # else not known yet: no log field
                                resp.dynamic_metadata.CopyFrom(usage_metadata(outcome))
                    yield resp
                else:
                    yield continue_message(kind)
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
        span = self._tracing.start_stream(context.invocation_metadata(), check_traceparent(req))
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
            h = header_map(req.response_headers)
            try:
                status = int(h.get(":status", "0"))
            except ValueError:
                status = 0
            mode = tracker.on_headers(
                status, h.get("content-type", ""), h.get("content-encoding", ""),
                upstream=from_upstream(req),
            )  # fmt: skip
        override = processing_mode_pb2.ProcessingMode(response_body_mode=_MODES[mode])
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=override)
