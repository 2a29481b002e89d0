"""The HTTP check port (``--check-http-address``): ``/check/<path>`` and ``POST /settle``.

For gateways that cannot speak gRPC (Kong's OpenResty) and for Envoy's ext_authz
``http_service`` mode. Decisions and settlements are the gRPC servicers' own
(:mod:`authz.httpcheck.check`, :mod:`authz.httpcheck.settle`); this module is the
transport, and it bounds everything a caller sends:

- who: the gRPC port's rules (authz/listen.py): loopback by default, mTLS with a
  required client certificate (authz/httpcheck/tls.py), or ``--insecure-plaintext``;
- headers: a line or header of at most 16 KiB, at most 128 headers (aiohttp refuses
  more with 400 before any handler runs); Envoy's own limit is 60 KiB in all;
- bodies: a Check reads at most ``bounds.request_body_bytes`` + 1 (more is handled as
  Envoy's truncated body is), a settle at most ``bounds.response_decoded_bytes``
  (more is a truncated copy); the rest is never read, and the connection is closed;
- time: reading a body may take :data:`BODY_TIMEOUT_S`; an idle keep-alive connection
  is closed after :data:`KEEPALIVE_S`.

A caller that goes away mid-Check cancels the handler (``handler_cancellation``), and
the gRPC servicer's :class:`authz.envoy.unanswered.Unanswered` releases the reservation,
as for a gRPC call Envoy gave up on; a decision that finds the connection already
closed is released the same way. On SIGTERM the listener closes and in-flight requests
get ``grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import replace
from typing import Any, cast

import grpc
from aiohttp import web

from authz.envoy.authz import AuthorizationServicer
from authz.envoy.extproc import ExternalProcessorServicer
from authz.errors import AddressInUse, AuthzError
from authz.handles import HandleKeys, SettleRefusal
from authz.httpcheck.check import check_request, http_answer, original_path
from authz.httpcheck.rewrite import gateway_cut, rewrite_answer, wants_rewrite
from authz.httpcheck.settle import BadSettle, outcome_of, parse_settle, verify
from authz.httpcheck.tls import ReloadingContext
from authz.policy.store import PolicyStore
from authz.telemetry.metrics import Metrics

__all__ = ["BODY_TIMEOUT_S", "KEEPALIVE_S", "CheckHttpServer"]

log = logging.getLogger("authz.httpcheck")
BODY_TIMEOUT_S = 30.0
KEEPALIVE_S = 75.0
_FIELD = 16 * 1024
_EXPECTED_TIMEOUT = "x-envoy-expected-rq-timeout-ms"


class _Gone(Exception):
    """The caller closed the connection before the answer: nothing to send."""


class _Context:
    """What the gRPC servicer asks of its call context, for an HTTP request.

    Envoy's http_service client says how long it waits (``x-envoy-expected-rq-timeout-ms``,
    its ``server_uri.timeout``): that is the call's deadline, as a gRPC deadline is, so
    an answer decided too close to it is released and answered 504 (a 5xx: Envoy then
    answers its ``status_on_error``, as for its own timeout). Without the header (Kong)
    there is no deadline; a caller that closed its connection is "no time left".
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._deadline: float | None = None
        raw = request.headers.get(_EXPECTED_TIMEOUT, "")
        if raw.isascii() and raw.isdigit() and 0 < len(raw) <= 7:
            self._deadline = time.monotonic() + int(raw) / 1000

    def time_remaining(self) -> float | None:
        # Unanswered reads less than its margin as "too late to answer": release, abort.
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return 0.0
        return None if self._deadline is None else self._deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Gone(details)

    def invocation_metadata(self) -> tuple[()]:
        return ()  # the servicer then reads traceparent from the headers

    def peer(self) -> str:
        return str(self._request.remote or "")


async def _read(request: web.Request, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the body, and whether that was all of it."""
    out = bytearray()
    async with asyncio.timeout(BODY_TIMEOUT_S):
        while len(out) < cap:
            chunk = await request.content.read(min(cap - len(out), 1 << 16))
            if not chunk:
                return bytes(out), True
            out += chunk
        return bytes(out), request.content.at_eof() or await request.content.read(1) == b""


class CheckHttpServer:
    def __init__(self, store: PolicyStore, checks: AuthorizationServicer,
                 extproc: ExternalProcessorServicer, handles: HandleKeys, metrics: Metrics,
                 tls: ReloadingContext | None = None, grace_s: float = 10.0) -> None:  # fmt: skip
        self._store = store
        self._grace_s = grace_s
        self._checks = checks
        self._extproc = extproc
        self._handles = handles
        self._metrics = metrics
        self._tls = tls
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=1)  # bodies are read by _read, bounded
        app.router.add_post("/settle", self._settle)
        app.router.add_route("*", "/check", self._check)
        app.router.add_route("*", "/check/{rest:.*}", self._check)
        self._app = app

    async def _check(self, request: web.Request) -> web.StreamResponse:
        path = original_path(request.raw_path)
        if path is None:
            raise web.HTTPNotFound()
        context = _Context(request)  # the gateway's clock runs from here (or earlier)
        cap = self._store.current.bounds.request_body_bytes
        body, whole = await _read(request, cap + 1)  # one more: the enforcer sees "too big"
        msg = check_request(request.method, path, request.headers.items(), body)
        try:
            resp = await self._checks.Check(msg, cast(Any, context))
        except _Gone:  # gone, or too late: the reservation is released (Unanswered)
            return _text(504, "decided too late: the gateway no longer waits")
        answer_ = http_answer(resp)
        if wants_rewrite(request.headers):  # Kong: the body to send upstream (rewrite.py)
            add_usage = self._store.current.requests.add_stream_usage
            complete = whole and not gateway_cut(request.headers)
            answer_ = await rewrite_answer(answer_, body, complete, add_usage,
                                           self._extproc.release_uncapped)  # fmt: skip
        status, headers, payload = answer_
        answer = web.Response(status=status, body=payload or None)
        for key, value in headers:
            answer.headers.add(key, value)
        if not whole:
            answer.force_close()  # the rest of the body was never read
        return answer

    async def _settle(self, request: web.Request) -> web.StreamResponse:
        try:
            req = parse_settle(request.headers)
        except BadSettle as exc:
            return _text(400, str(exc))
        found = verify(req.token, self._handles)
        if isinstance(found, SettleRefusal):
            self._metrics.settle_refused.labels(found.value).inc()
            log.warning(
                "settlement refused: the reservation handle does not verify",
                extra={"reason": found.value, "peer": request.remote or ""},
            )
            if found is SettleRefusal.MALFORMED:
                return _text(400, "x-authz-handle is not a handle this service issued")
            return _text(403, "x-authz-handle does not verify: nothing settled")
        bounds = self._store.current.bounds
        body, whole = await _read(request, bounds.response_decoded_bytes)
        if not whole:  # more than ext_proc would read: settled as a truncated copy
            req = replace(req, truncated=True)
        outcome = await outcome_of(found.info, req, body, bounds)
        if not await self._extproc.settle_outcome(found.info, outcome, found.department):
            return _text(503, "settlement failed; retry (settling is idempotent)")
        answer = web.Response(status=204)
        if not whole:
            answer.force_close()
        return answer

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self._runner = web.AppRunner(
            self._app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_S,
            max_line_size=_FIELD, max_field_size=_FIELD, max_headers=128,
            shutdown_timeout=self._grace_s,
        )  # fmt: skip
        await self._runner.setup()
        where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        ssl_context = self._tls.context if self._tls is not None else None
        try:
            site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context,
                               reuse_address=True, reuse_port=reuse_port or None)  # fmt: skip
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"the HTTP check address {where} is already in use") from None
            raise AuthzError(f"cannot listen on the HTTP check address {where}: {exc}") from None

    async def stop(self) -> None:
        """Stop listening; requests in flight get ``grace_s`` to finish."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")
