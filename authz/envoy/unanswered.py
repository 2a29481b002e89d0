"""Reservations whose Check answer Envoy never used are released, not left held.

Envoy waits ``grpc_service.timeout`` (1 s in the shipped envoy.yaml, 250 ms before) for a Check;
past it the client gets ``status_on_error`` and the request never reaches the model.
On a loaded machine the service can still finish that Check afterwards: the ledger
took the reservation, the answer goes nowhere, and no ext_proc stream will ever settle
it. It stayed held until its deadline (``reservations.ttl_s``, 10 minutes) and was then
charged its expiry amount for a request the upstream never saw: issue 10 finding 3
("55 units still held after both replicas stopped cleanly", one Check's reservation).

So each Check's answer is watched up to the moment it is handed to gRPC:
- cancelled while deciding (Envoy gave up, or the deadline passed): the decision is
  left to finish (a reservation may be half made, in the store) and released after;
- answered with less than :data:`MARGIN_S` of the call's deadline left (or none):
  DEADLINE_EXCEEDED instead, Envoy answers its ``status_on_error`` as for its own
  timeout, and the reservation is released. (gRPC's done callback does not say
  whether the answer went out: a reply sent after the deadline shows neither
  ``cancelled()`` nor a code, only a logged ExecuteBatchError.)
A release is a settle of 0, idempotent, through the breaker (journaled if the store is
down). What is left: an answer sent with more than the margin left that still reached
Envoy after its timer fired; it is held until its deadline and charged at expiry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from authz.proto.external_auth_pb2 import CheckResponse

__all__ = ["MARGIN_S", "Unanswered"]

log = logging.getLogger("authz.check")
# An admission decided with less than this left of the call's deadline is answered
# with an error instead (and released): Envoy's timer started before the call reached
# us, and a reply this close to it may land after Envoy stopped waiting.
MARGIN_S = 0.05


class Unanswered:
    def __init__(self, release: Callable[[str], Awaitable[bool]]) -> None:
        self._release = release
        self._pending: set[asyncio.Task[Any]] = set()
        self.released = 0

    async def answer(self, check: Awaitable[CheckResponse], context: Any) -> CheckResponse:
        """``check``'s response; its reservation is released if Envoy cannot have used it."""
        task = asyncio.ensure_future(check)
        try:
            # Shielded: cancelling the Check must not cut a ledger call off half-way.
            response = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._after_cancel)
            self._keep(task)
            raise
        rid = reservation_of(response)
        # None: no deadline (or a stand-in context without one, as in unit tests).
        remaining = getattr(context, "time_remaining", None)
        left = remaining() if remaining is not None else None
        if rid and left is not None and left < MARGIN_S:
            # Too late to be sure Envoy still waits: an error it would answer anyway.
            self._spawn(rid)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "decided too late")
        return response

    def _after_cancel(self, task: asyncio.Task[CheckResponse]) -> None:
        if not task.cancelled() and task.exception() is None:
            rid = reservation_of(task.result())
            if rid:
                self._spawn(rid)

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _spawn(self, rid: str) -> None:
        self.released += 1
        log.info(
            "check answer not delivered: releasing its reservation", extra={"reservation": rid}
        )
        self._keep(asyncio.get_running_loop().create_task(self._release_quietly(rid)))

    async def _release_quietly(self, rid: str) -> None:
        try:
            await self._release(rid)
        except Exception:  # the reservation then expires as before; never crash the loop
            log.exception("release of undelivered check %s failed", rid)

    async def drain(self) -> None:
        """Wait for decisions and releases still running (graceful stop)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


def reservation_of(response: CheckResponse) -> str:
    """The reservation an allowing CheckResponse carries ("" if none)."""
    ns = response.dynamic_metadata.fields
    return ns["reservation_id"].string_value if "reservation_id" in ns else ""
