"""Spans: one per Check, one per ext_proc stream, ledger calls as their children.

Each span is parented on the trace context Envoy sends, so it sits inside the request's
own trace. Where that context is found, first hit wins:

1. gRPC metadata ``traceparent``. When Envoy traces, its gRPC client opens a span for
   each call it makes (``async envoy.service.auth.v3.Authorization.Check egress``,
   ``... ExternalProcessor.Process egress``) and injects it there: our span is that
   span's child. This needs no Envoy setting beyond turning its tracer on.
2. Check only: the HTTP request's ``traceparent`` header, which reaches us in the
   CheckRequest (``allowed_headers`` in envoy/envoy.yaml). That is the *client's* span:
   it keeps us in the client's trace when Envoy does not trace itself.
3. ext_proc only: the Check span, whose context the Check writes into the ext_authz
   dynamic metadata (``traceparent``), which Envoy forwards to the stream
   (``metadata_options.forwarding_namespaces``). With request headers skipped, ext_proc
   sees no request header, so this is how the settle span still joins the trace.

Off (no ``OTEL_*`` configured, see :mod:`authz.telemetry.otel`) the servicers hold
``None`` instead of a :class:`Tracing` and call nothing here: no span, no context, no
carrier dict is built on the request path.

Span attributes follow the GenAI semantic conventions where one exists
(``gen_ai.request.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.operation.name``) and ``authz.*`` otherwise. The subject path is on the span (a
trace is per request, so a user id there is fine); it is never a metric label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.apis import Api
from authz.decision import Decision
from authz.ledger.base import Limit, Refusal, Reservation, SettleOutcome
from authz.usage.types import TokenUsage

__all__ = ["TracedLedger", "Tracing", "traceparent_of"]

_PROPAGATOR = TraceContextTextMapPropagator()
_OPERATION = {
    Api.OPENAI_CHAT: "chat",
    Api.OPENAI_COMPLETIONS: "text_completion",
    Api.OPENAI_RESPONSES: "chat",
    Api.OPENAI_EMBEDDINGS: "embeddings",
    Api.ANTHROPIC_MESSAGES: "chat",
}
_SYSTEM = {Api.ANTHROPIC_MESSAGES: "anthropic"}


def _carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate") and isinstance(value, str) and value:
            out[key] = value
    return out


def traceparent_of(span: Span) -> str | None:
    """The W3C ``traceparent`` naming ``span`` (None for an invalid span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


class Tracing:
    """Starts and fills the spans; built only when tracing is configured."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    # ---------------------------------------------------------------- ext_authz Check
    def start_check(
        self, metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str]
    ) -> Span:
        carrier = _carrier(metadata)
        if "traceparent" not in carrier and headers.get("traceparent"):
            carrier = {"traceparent": headers["traceparent"]}
            if headers.get("tracestate"):
                carrier["tracestate"] = headers["tracestate"]
        ctx = _PROPAGATOR.extract(carrier) if carrier else None
        return self.tracer.start_span("authz.check", context=ctx, kind=SpanKind.SERVER)

    @staticmethod
    def decided(span: Span, d: Decision, model_label: str | None = None) -> None:
        if not span.is_recording():
            return
        attrs: dict[str, Any] = {"authz.verdict": d.verdict.value}
        if d.reason is not None:
            attrs["authz.reason"] = d.reason.value
            attrs["http.response.status_code"] = d.status
        if d.detail:
            attrs["authz.reason.detail"] = d.detail
        if d.subject is not None:
            attrs["authz.subject"] = str(d.subject)
            attrs["authz.org"] = d.subject.org
        if d.api is not None:
            attrs["authz.api"] = d.api.value
            attrs["gen_ai.operation.name"] = _OPERATION[d.api]
            attrs["gen_ai.system"] = _SYSTEM.get(d.api, "openai")
        if d.model is not None:
            attrs["gen_ai.request.model"] = d.model
        if model_label is not None:
            attrs["authz.model_rule"] = model_label
        if d.quota is not None:
            # On a denial: the budget that refused; on an allow: the tightest one.
            attrs["authz.budget"] = d.quota.budget
            attrs["authz.budget.node"] = d.quota.node
            attrs["authz.budget.limit"] = d.quota.limit
            attrs["authz.budget.remaining"] = d.quota.remaining
        if d.reservation_id is not None:
            attrs["authz.reservation_id"] = d.reservation_id
            attrs["authz.reserved.input_tokens"] = d.input_estimate
            attrs["authz.reserved.output_tokens"] = d.output_reserved
        span.set_attributes(attrs)
        if not d.allowed:
            # A denial is a correct answer, not an error; mark it so it is easy to find.
            span.add_event("authz.denied", {"authz.reason": attrs.get("authz.reason", "")})

    # ---------------------------------------------------------------- ext_proc stream
    def start_stream(
        self, metadata: Iterable[tuple[str, Any]] | None, check_traceparent: str | None
    ) -> Span:
        carrier = _carrier(metadata)
        if "traceparent" not in carrier and check_traceparent:
            carrier = {"traceparent": check_traceparent}
        ctx = _PROPAGATOR.extract(carrier) if carrier else None
        return self.tracer.start_span("authz.settle", context=ctx, kind=SpanKind.SERVER)

    @staticmethod
    def stream_info(span: Span, reservation_id: str, subject: str, model: str, api: str) -> None:
        if span.is_recording():
            attrs: dict[str, Any] = {"authz.reservation_id": reservation_id, "authz.api": api}
            if subject:
                attrs["authz.subject"] = subject
            if model:
                attrs["gen_ai.request.model"] = model
            span.set_attributes(attrs)

    @staticmethod
    def settled(span: Span, kind: str, usage: TokenUsage, done: bool) -> None:
        if span.is_recording():
            span.set_attributes(
                {
                    "authz.settle.outcome": kind if done else "duplicate",
                    "gen_ai.usage.input_tokens": usage.input_tokens + usage.cached_input_tokens,
                    "gen_ai.usage.output_tokens": usage.output_tokens,
                    "authz.usage.cached_input_tokens": usage.cached_input_tokens,
                    "authz.usage.exact": usage.exact,
                }
            )

    @staticmethod
    def failed(span: Span, exc: BaseException) -> None:
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class TracedLedger:
    """A ledger whose reserve/settle calls become child spans of the current span.

    Calls made outside any recorded span (the expiry sweep) are not traced: a root span
    per sweep would only be noise. Everything else is passed through untouched.
    """

    def __init__(self, inner: Any, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def reserve(
        self,
        reservation_id: str,
        limits: tuple[Limit, ...],
        tokens: TokenUsage,
        *,
        deadline: float,
        expiry_charge: TokenUsage,
        model: str = "",
    ) -> Reservation | Refusal:
        if not trace.get_current_span().is_recording():
            return await self._inner.reserve(  # type: ignore[no-any-return]
                reservation_id,
                limits,
                tokens,
                deadline=deadline,
                expiry_charge=expiry_charge,
                model=model,
            )
        with self._tracer.start_as_current_span("authz.ledger.reserve") as span:
            span.set_attribute("authz.ledger.limits", len(limits))
            out = await self._inner.reserve(
                reservation_id,
                limits,
                tokens,
                deadline=deadline,
                expiry_charge=expiry_charge,
                model=model,
            )
            if isinstance(out, Refusal):
                span.set_attributes(
                    {
                        "authz.ledger.outcome": "refused",
                        "authz.budget": out.limit.budget,
                        "authz.budget.node": out.limit.node,
                        "authz.ledger.requested": out.requested,
                        "authz.ledger.remaining": out.remaining,
                    }
                )
            else:
                span.set_attribute("authz.ledger.outcome", "reserved")
            return out  # type: ignore[no-any-return]

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        if not trace.get_current_span().is_recording():
            return await self._inner.settle(reservation_id, actual)  # type: ignore[no-any-return]
        with self._tracer.start_as_current_span("authz.ledger.settle") as span:
            out: SettleOutcome = await self._inner.settle(reservation_id, actual)
            span.set_attributes(
                {"authz.ledger.settled": out.settled, "authz.ledger.late": out.late}
            )
            return out

    async def expire(self, now: float) -> int:
        return await self._inner.expire(now)  # type: ignore[no-any-return]

    async def balance(self, limit: Limit) -> Any:
        return await self._inner.balance(limit)

    async def close(self) -> None:
        await self._inner.close()
