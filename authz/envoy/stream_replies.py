"""The ext_proc answers that are not "continue": a refusal, usage for the access log,
and the cost of a settlement for the metrics."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from authz.decision import Decision, DenyReason, Verdict
from authz.envoy.convert import error_body
from authz.policy.model import Policy
from authz.policy.prices import bill
from authz.proto import base_pb2, http_status_pb2
from authz.proto import external_processor_pb2 as pb
from authz.settle import Outcome, ReservationInfo

__all__ = [
    "continue_message",
    "settled_cost",
    "uncapped_denial",
    "uncapped_refusal",
    "usage_metadata",
]

_USAGE_NS = "authz.usage"
_CONTINUE_BODY = pb.BodyResponse()


def uncapped_denial(info: ReservationInfo) -> tuple[list[tuple[str, str]], bytes]:
    """The headers and body of the 429 for a cap that could not be written."""
    cap = info.output_cap
    message = (
        f"This request fits the remaining budget only with its output limited to {cap} "
        f"tokens, and its body could not be rewritten to say so; send it with "
        f"max_tokens (or the API's output limit) at most {cap}."
    )
    d = Decision(Verdict.DENY, 429, DenyReason.BUDGET_EXHAUSTED, "output_cap_unwritable",
                 message, api=info.api)  # fmt: skip
    headers = [("content-type", "application/json"), ("x-authz-reason", d.reason or ""),
               ("x-authz-max-tokens", str(cap)), ("x-should-retry", "false")]  # fmt: skip
    return headers, error_body(d, "")


def uncapped_refusal(info: ReservationInfo) -> pb.ProcessingResponse:
    """A 429 in the provider's error format, for a cap that could not be written."""
    headers, body = uncapped_denial(info)
    mutation = pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))
            for k, v in headers
        ]
    )
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=429),  # type: ignore[arg-type]
            headers=mutation,
            body=body,
            details="authz_output_cap_unwritable",
        )
    )


def settled_cost(policy: Policy, model: str, outcome: Outcome) -> tuple[float, str] | None:
    """What the usage cost at the policy's prices, or None for a model without one."""
    price = policy.pricing.for_model(model or None)
    if price is None:
        return None
    # As the provider bills it: context tier, cache writes, service tier.
    return bill(price, outcome.usage) / 1_000_000, policy.pricing.currency


def usage_metadata(outcome: Outcome) -> struct_pb2.Struct:
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


def continue_message(kind: str | None) -> pb.ProcessingResponse:
    if kind == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    if kind == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if kind == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(request_body=_CONTINUE_BODY)
