"""Wiring, start-up and graceful stop of ``authz serve``.

One gRPC port serves ext_authz, ext_proc, gRPC health and reflection; one HTTP port
serves the admin endpoints; another the HTTP check API (authz/httpcheck). SIGHUP
reloads the policy; SIGTERM stops taking checks, lets in-flight RPCs and HTTP checks
finish, settles what is pending, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz.admin.http import AdminServer
from authz.clock import Clock, SystemClock
from authz.enforcer import Enforcer
from authz.envoy.authz import AuthorizationServicer
from authz.envoy.extproc import ExternalProcessorServicer
from authz.errors import AuthzError, PolicyError
from authz.handle_keys import REFRESH_S, open_handle_keys
from authz.httpcheck import CheckHttpServer
from authz.httpcheck.tls import ReloadingContext
from authz.ledger import Ledger, MemoryLedger, open_ledger
from authz.ledger.breaker import BreakerLedger
from authz.ledger.journal import Journal
from authz.ledger.sqlite import SqliteLedger
from authz.listen import check_transport, ensure_free, jwt_authn_guard
from authz.manage.service import Management
from authz.observability import Observability
from authz.observer import Observers
from authz.policy.store import PolicyStore
from authz.proto import (
    external_auth_pb2,
    external_auth_pb2_grpc,
    external_processor_pb2,
    external_processor_pb2_grpc,
)
from authz.readiness import Readiness
from authz.reclaim import release_memory
from authz.telemetry.ledger_file import LedgerFileCollector
from authz.telemetry.metrics import Metrics
from authz.tls import ReloadingCredentials, TlsFiles

__all__ = ["ServeOptions", "serve"]

log = logging.getLogger("authz.server")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    config: str
    # Loopback unless told otherwise: who reaches the gRPC port can spend and settle
    # budgets (the rules are in authz/listen.py).
    grpc_address: str = "127.0.0.1:9191"
    http_address: str = "127.0.0.1:9192"
    # The HTTP check API (Kong, Envoy's http_service mode; authz/httpcheck): the gRPC
    # port's trust rules and TLS files. "" turns it off.
    check_http_address: str = "127.0.0.1:9193"
    tls: TlsFiles | None = None  # mTLS on the gRPC port, client certificate required
    insecure_plaintext: bool = False  # allow plaintext gRPC on a non-loopback address
    ledger_url: str | None = None
    grace_s: float = 10.0
    watch_interval_s: float = 1.0
    sweep_interval_s: float = 1.0
    # One of several workers on the same port (authz serve --workers N): the kernel
    # spreads incoming connections over every socket bound with SO_REUSEPORT.
    reuse_port: bool = False
    state_dir: str = "."  # relative journal paths resolve here (--state-dir, AUTHZ_STATE_DIR)
    # The key that signs reservation handles (authz/handle_keys.py says where it comes
    # from without one): --handle-key-file, AUTHZ_HANDLE_KEY_FILE.
    handle_key_file: str | None = None
    # The quota management API (authz/manage, docs/management-api.md). "" turns it off;
    # allocations made through any replica's API apply here either way.
    manage_address: str = "127.0.0.1:9194"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


# A shutdown phase slower than this is logged with its name and time: a stop that takes
# long then says where (the harness prints the log of a replica that was killed).
SLOW_PHASE_S = 2.0


async def _phase(name: str, step: Awaitable[object]) -> None:
    started = time.monotonic()
    await step
    took = time.monotonic() - started
    if took > SLOW_PHASE_S:
        log.warning("stopping: %s took %.1f s", name, took)


async def _every(interval: float, fn: object) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()  # type: ignore[operator]
        except Exception:
            log.exception("periodic task failed")


def _breaker(inner: Ledger, store: PolicyStore, clock: Clock, state_dir: str) -> BreakerLedger:
    """The circuit breaker and usage journal around the ledger (policy ``ledger.breaker``)."""
    settings = store.current.breaker
    path = os.path.join(state_dir, settings.journal_path)  # an absolute path stays as is
    try:
        journal = Journal.open(path, settings.journal_max_bytes)
    except OSError as exc:
        where = "ledger.breaker.journal_path"
        raise PolicyError(str(store.path), where, f"cannot open the journal: {exc}") from exc
    breaker = BreakerLedger(inner, settings, clock, journal)
    store.on_change(lambda policy: breaker.configure(policy.breaker))
    return breaker


async def serve(opts: ServeOptions) -> None:
    store = PolicyStore(opts.config)
    # Who may call the gRPC port: refused here, before anything opens or binds.
    mtls = opts.tls is not None
    check_transport(opts.grpc_address, mtls=mtls, insecure_plaintext=opts.insecure_plaintext)
    if opts.check_http_address:
        check_transport(opts.check_http_address, mtls=mtls,
                        insecure_plaintext=opts.insecure_plaintext, what="HTTP check")  # fmt: skip
    if opts.manage_address:
        check_transport(opts.manage_address, mtls=mtls, what="management API",
                        insecure_plaintext=opts.insecure_plaintext)  # fmt: skip
    store.guard(jwt_authn_guard(str(store.path), mtls=mtls))
    tls = ReloadingCredentials(opts.tls) if opts.tls is not None else None
    if not opts.reuse_port:  # --workers: the other workers hold the gRPC port on purpose
        ensure_free(opts.grpc_address, "gRPC")
    ensure_free(opts.http_address, "admin HTTP")
    if opts.check_http_address and not opts.reuse_port:
        ensure_free(opts.check_http_address, "HTTP check")
    check_tls = ReloadingContext(opts.tls) if opts.tls and opts.check_http_address else None
    clock = SystemClock()
    metrics = Metrics()
    ledger_url = opts.ledger_url or store.current.ledger_url
    # Traces, audit trail, alerts (see authz/observability.py); OTel only if OTEL_* is set.
    obs = Observability(store, ledger_url, clock, metrics)
    try:  # sqlite:// (relative to --state-dir) is locked and loaded here: a second
        # process on the same file stops now, with one line (LedgerLocked)
        inner = open_ledger(ledger_url, clock, state_dir=opts.state_dir)
    except ValueError as exc:  # a bad --ledger / AUTHZ_LEDGER_URL (the policy's is validated)
        raise AuthzError(f"ledger URL: {exc}") from exc
    if isinstance(inner, MemoryLedger):
        log.warning(
            "ledger memory:// keeps usage in this process only: a restart makes every budget"
            " full again. Use sqlite:///authz-state/ledger.db (one process) or redis://"
        )
    elif isinstance(inner, SqliteLedger):  # a failing disk shows here, not in decisions
        metrics.registry.register(LedgerFileCollector(inner))
    # The breaker and its journal guard a store across the network. The embedded ledgers
    # (memory, and sqlite: memory written behind to a local file) cannot be unreachable;
    # wrapping them would only let a slow event loop (a GC pause, a CPU-starved pod)
    # "open" the breaker and deny traffic for no reason.
    breaker = None
    if not isinstance(inner, MemoryLedger | SqliteLedger):
        breaker = _breaker(inner, store, clock, opts.state_dir)
    ledger = obs.ledger(breaker or inner)
    manage = Management(store, ledger_url, opts.state_dir, clock, audit=obs.audit.record)
    enforcer = Enforcer(store, ledger, clock, observer=Observers([obs.observer, manage.seen]))
    enforcer.overlay = manage.overlay
    metrics.queue_depth.set_function(lambda: enforcer.queue_depth)
    enforcer.on_queue_wait(metrics.queue_wait.observe)

    # SO_REUSEPORT stays off for a single process, so a second copy started by mistake
    # fails to bind instead of silently taking half the traffic.
    # Receive no bigger message than Envoy sends: an ext_proc body BUFFERED up to the
    # listener's buffer limit, plus headers and metadata (policy bounds.grpc_max_message_bytes;
    # read at start, a reload does not resize). gRPC's own default is 4 MiB.
    max_message = store.current.bounds.grpc_max_message_bytes
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(opts.reuse_port)),
                                      ("grpc.max_receive_message_length", max_message)])
    # One key for both servicers: ext_proc settles only what Check signed (authz/handles.py).
    handles, refresh_handles = await open_handle_keys(
        opts.handle_key_file, ledger_url, opts.state_dir
    )
    checks = AuthorizationServicer(enforcer, metrics, obs.tracing, obs.decision_log,
                                   handles=handles)  # fmt: skip
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(checks, server)
    extproc = ExternalProcessorServicer(enforcer, metrics, obs.tracing, handles=handles)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(extproc, server)
    check_http = CheckHttpServer(store, checks, extproc, handles, metrics, check_tls, opts.grace_s)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if tls is not None:
            server.add_secure_port(opts.grpc_address, tls.credentials())
        else:
            server.add_insecure_port(opts.grpc_address)
    except RuntimeError as exc:  # gRPC's bind error; ensure_free caught the usual cause
        raise AuthzError(f"cannot listen on the gRPC address {opts.grpc_address}: {exc}") from None

    readiness = Readiness(breaker, type(inner).__name__)
    metrics.watch_breaker(breaker.snapshot if breaker is not None else None)
    metrics.watch_directory(enforcer.directory_stats)
    readiness.directory = enforcer.directory_stats
    admin = AdminServer(metrics, readiness.state)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loop.add_signal_handler(signal.SIGHUP, store.reload)
    metrics.reload_failures.set_function(lambda: store.reload_failures)

    async def sweep() -> None:
        n = await enforcer.expire_overdue()
        if n:
            metrics.expired.inc(n)
            log.info("expired %d unsettled reservations", n)
        # Memory follows activity (issue 9, #7): callers idle for a minute or two are
        # forgotten, and after many, the freed memory goes back to the OS (reclaim.py).
        release_memory(enforcer.forget_idle())

    await enforcer.start()
    if breaker is not None:
        await breaker.start()  # replays, in the background, what a previous process journaled
    # Admin first: a worker that cannot bind its admin port (--workers: the port + i)
    # must fail before it takes a single connection on the shared gRPC port.
    await admin.start(*_split(opts.http_address))
    if opts.check_http_address:
        await check_http.start(*_split(opts.check_http_address), reuse_port=opts.reuse_port)
    await manage.start(ledger, opts.manage_address, opts.tls)
    await server.start()
    for name in (
        "",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    obs.start()
    tasks = [
        asyncio.create_task(store.watch(opts.watch_interval_s)),
        asyncio.create_task(_every(opts.sweep_interval_s, sweep)),
        asyncio.create_task(readiness.watch()),
    ]
    if refresh_handles is not None:  # a Redis ledger: follow the shared key
        tasks.append(asyncio.create_task(_every(REFRESH_S, refresh_handles)))
    readiness.serving = True
    log.info(
        "serving",
        extra={
            "grpc": opts.grpc_address,
            "grpc_tls": "mtls" if tls is not None else "plaintext",
            "http": opts.http_address,
            "check_http": opts.check_http_address or "off",
            "manage": opts.manage_address or "off",
            "policy": opts.config,
            "ledger": type(inner).__name__,
            "breaker_mode": store.current.breaker.mode if breaker else "none (embedded)",
            "pid": os.getpid(),
        },
    )
    await stop.wait()

    log.info("stopping: no new checks, finishing in-flight requests")
    readiness.serving = False
    await health_servicer.enter_graceful_shutdown()
    # Both check ports refuse new requests, then wait for the running ones.
    await _phase("check ports", asyncio.gather(server.stop(opts.grace_s), check_http.stop()))
    await _phase("management API", manage.stop())
    await _phase("unanswered releases", checks.unanswered.drain())  # answers Envoy never got
    await _phase("settlements", extproc.drain())
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
    await _phase("sweep", sweep())
    await _phase("telemetry", obs.close())  # a last alert tick; audit, webhooks, OTel flushed
    await _phase("ledger", ledger.close())
    await enforcer.aclose()
    await admin.stop()
    log.info("stopped")
