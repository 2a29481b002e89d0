"""The ext_authz gRPC servicer: CheckRequest -> Enforcer.check -> CheckResponse."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span

from authz.decision import Decision
from authz.enforcer import Enforcer
from authz.envoy.convert import check_input, check_response
from authz.envoy.unanswered import Unanswered
from authz.handles import HandleKeys
from authz.policy.model import Policy
from authz.proto import external_auth_pb2 as authz_pb2
from authz.proto import external_auth_pb2_grpc as authz_grpc
from authz.telemetry.logging import trace_ids
from authz.telemetry.metrics import Metrics
from authz.telemetry.tracing import Tracing, traceparent_of

__all__ = ["AuthorizationServicer"]

log = logging.getLogger("authz.check")


class AuthorizationServicer(authz_grpc.AuthorizationServicer):
    def __init__(
        self,
        enforcer: Enforcer,
        metrics: Metrics,
        tracing: Tracing | None = None,
        decision_log: str = "denials",
        *,
        handles: HandleKeys,
    ) -> None:
        self._enforcer = enforcer
        self._handles = handles  # signs each reservation for ext_proc (authz.handles)
        self._metrics = metrics
        self._tracing = tracing  # None: tracing is off and nothing of it runs here
        # Reservations of answers Envoy never got are released (authz/envoy/unanswered.py).
        self.unanswered = Unanswered(enforcer.release)
        # "all": a line per decision; "denials" (default): denials only; "off": none.
        self._log_allows = decision_log == "all"
        self._log_denials = decision_log in ("all", "denials")

    async def Check(
        self, request: authz_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> authz_pb2.CheckResponse:
        return await self.unanswered.answer(self._traced(request, context), context)

    async def _traced(
        self, request: authz_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> authz_pb2.CheckResponse:
        tracing = self._tracing
        if tracing is None:
            return await self._check(request, context, None)
        span = tracing.start_check(
            context.invocation_metadata(), request.attributes.request.http.headers
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                return await self._check(request, context, span)
            except BaseException as exc:
                tracing.failed(span, exc)
                raise

    async def _check(
        self,
        request: authz_pb2.CheckRequest,
        context: grpc.aio.ServicerContext,
        span: Span | None,
    ) -> authz_pb2.CheckResponse:
        with self._metrics.check_timer():
            policy = self._enforcer.policy
            inp = check_input(request, policy.identity.envoy_payload_key)
            decision = await self._enforcer.check(inp)
            model = self._model_label(policy, decision.model)
            self._metrics.decision(decision, model)
            if self._log_allows if decision.allowed else self._log_denials:
                self._log(decision, model, context, inp.headers, span)
            response = check_response(decision, inp, self._handles)
            if span is not None:
                Tracing.decided(span, decision, model)
                parent = traceparent_of(span)
                if parent is not None:
                    # ext_proc's fallback parent when Envoy itself does not trace.
                    response.dynamic_metadata.fields["traceparent"].string_value = parent
            return response

    @staticmethod
    def _model_label(policy: Policy, model: str | None) -> str:
        # ModelPolicy memoises its rule lookups (bounded), so this costs a dict hit.
        return "" if model is None else policy.models.label(model)

    def _log(
        self,
        d: Decision,
        model: str,
        context: grpc.aio.ServicerContext,
        headers: Mapping[str, str],
        span: Span | None,
    ) -> None:
        extra: dict[str, object] = {
            "decision": d.verdict.value,
            "reason": d.reason.value if d.reason else None,
            "subject": str(d.subject) if d.subject else None,
            "model": d.model,
            "model_rule": model or None,
            "status": d.status,
        }
        if d.reservation_id:
            extra["reservation"] = d.reservation_id
        if d.quota is not None:
            extra["budget"] = d.quota.budget
            extra["node"] = d.quota.node
        if span is None:
            # Tracing off: still name the request's trace, so the line can be found
            # from Envoy's trace or access log.
            ids = trace_ids(context.invocation_metadata(), headers)
            if ids is not None:
                extra["trace_id"], extra["parent_span_id"] = ids
        log.info("decision", extra=extra)
