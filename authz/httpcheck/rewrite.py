"""The request body a gateway without ext_proc must send upstream, made by the Check.

Behind Envoy, ext_proc rewrites the request body (:mod:`authz.mutate.request`): it
writes the output limit a request was admitted with (``x-authz-max-tokens``) and asks
OpenAI streams for ``stream_options.include_usage``. Kong's plugin has no ext_proc, and
re-implementing those rules in Lua (which API, which field, which body may be touched)
would give two answers to one question. So the plugin asks its Check for the body:

- request header ``x-authz-rewrite-body: true`` (the gateway sets it; it is harmless
  from anyone else: Envoy's ``http_service`` client ignores the body of an allow);
- answer header ``x-authz-request-body``: ``rewritten`` (the answer's body is the
  request body to send upstream, byte for byte what ext_proc would have sent) or
  ``unchanged`` (send the client's body as it is);
- answer header ``x-authz-usage-added: true``: the service, not the client, asked for
  usage; the gateway removes the usage-only chunk and the ``"usage": null`` members it
  causes from the stream the client sees (the plugin's ``usage_chunk.lua``, the rules
  of :mod:`authz.mutate.response`), and settles from the upstream's bytes.

A request admitted with a lowered output limit whose body cannot carry it (not a JSON
object, bigger than Check reads, or cut by the gateway: ``x-envoy-auth-partial-body``)
must not go upstream at all: it is answered as ext_proc answers it, a 429
(``output_cap_unwritable``), and its reservation is released here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from authz.envoy.stream_metadata import reservation_info
from authz.envoy.stream_replies import uncapped_denial
from authz.handle_token import HANDLE_HEADER, decode_token
from authz.httpcheck.check import HttpAnswer
from authz.mutate.request import USAGE_APIS, CapUnwritable, RequestChanges, rewrite_request
from authz.offload import INLINE_BYTES, run_off_loop
from authz.settle import ReservationInfo

__all__ = [
    "BODY_HEADER",
    "REWRITE_HEADER",
    "USAGE_ADDED_HEADER",
    "Rewrite",
    "gateway_cut",
    "plan_rewrite",
    "rewrite_answer",
    "wants_rewrite",
]

REWRITE_HEADER = "x-authz-rewrite-body"
BODY_HEADER = "x-authz-request-body"
USAGE_ADDED_HEADER = "x-authz-usage-added"
_PARTIAL = "x-envoy-auth-partial-body"


@dataclass(frozen=True, slots=True)
class Rewrite:
    body: bytes | None  # the body to send upstream; None: the client's, unchanged
    usage_added: bool  # the service asked for include_usage: undo it in the response


def wants_rewrite(headers: Mapping[str, str]) -> bool:
    return headers.get(REWRITE_HEADER, "").strip().lower() == "true"


def plan_rewrite(
    info: ReservationInfo, body: bytes, whole: bool, add_stream_usage: bool
) -> Rewrite | None:
    """What to send upstream for this reservation's request; None when its output cap
    cannot be written (the request must then be refused). ``whole``: ``body`` is all of
    the client's body (else only a rewrite that needs no body is possible: none)."""
    cap = info.output_cap or None
    if not whole:
        return None if cap is not None else Rewrite(None, False)
    changes = RequestChanges()
    add_usage = info.api in USAGE_APIS and add_stream_usage
    try:
        new = rewrite_request(body, info.api, changes, add_usage=add_usage, cap=cap)
    except CapUnwritable:
        return None
    return Rewrite(new, changes.added_include_usage)


def _info(headers: list[tuple[str, str]]) -> ReservationInfo | None:
    for key, value in headers:
        if key == HANDLE_HEADER:
            found = decode_token(value)  # our own token, just made: it decodes
            return reservation_info(found[0]) if isinstance(found, tuple) else None
    return None


async def rewrite_answer(
    answer: HttpAnswer,
    body: bytes,
    whole: bool,
    add_stream_usage: bool,
    release: Callable[[ReservationInfo], Awaitable[None]],
) -> HttpAnswer:
    """The allow ``answer`` with the rewritten body (or its refusal), for a gateway that
    asked (:func:`wants_rewrite`). ``whole``: the service read all of the body and the
    gateway did not cut it. ``release`` gives back a refused request's reservation."""
    status, headers, _ = answer
    info = _info(headers)
    if status != 200 or info is None:  # a denial, or unmetered: nothing is rewritten
        return answer
    if len(body) <= INLINE_BYTES:
        plan = plan_rewrite(info, body, whole, add_stream_usage)
    else:  # parsed and re-encoded: a big body off the event loop, as ext_proc does
        plan = await run_off_loop(plan_rewrite, info, body, whole, add_stream_usage)
    if plan is None:
        await release(info)
        deny_headers, deny_body = uncapped_denial(info)
        return 429, deny_headers, deny_body
    headers = list(headers)
    headers.append((BODY_HEADER, "unchanged" if plan.body is None else "rewritten"))
    if plan.usage_added:
        headers.append((USAGE_ADDED_HEADER, "true"))
    return 200, headers, plan.body or b""


def gateway_cut(headers: Mapping[str, str]) -> bool:
    """Whether the gateway says it sent only the head of the body."""
    return headers.get(_PARTIAL, "").strip().lower() == "true"
