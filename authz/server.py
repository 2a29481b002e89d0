"""Wiring, start-up and graceful stop of ``authz serve``.

One gRPC port serves ext_authz, ext_proc, gRPC health and reflection; one HTTP port
serves the admin endpoints. SIGHUP reloads the policy; SIGTERM stops taking checks,
lets in-flight RPCs finish, settles what is pending, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz.admin.http import AdminServer
from authz.clock import SystemClock
from authz.enforcer import Enforcer
from authz.envoy.authz import AuthorizationServicer
from authz.envoy.extproc import ExternalProcessorServicer
from authz.ledger import open_ledger
from authz.policy.store import PolicyStore
from authz.telemetry.metrics import Metrics

__all__ = ["ServeOptions", "serve"]

log = logging.getLogger("authz.server")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    config: str
    grpc_address: str = "0.0.0.0:9191"
    http_address: str = "0.0.0.0:9192"
    ledger_url: str | None = None
    grace_s: float = 10.0
    watch_interval_s: float = 1.0
    sweep_interval_s: float = 1.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _every(interval: float, fn: object) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()  # type: ignore[operator]
        except Exception:
            log.exception("periodic task failed")


async def serve(opts: ServeOptions) -> None:
    store = PolicyStore(opts.config)
    clock = SystemClock()
    metrics = Metrics()
    ledger = open_ledger(opts.ledger_url or store.current.ledger_url, clock)
    enforcer = Enforcer(store, ledger, clock)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(enforcer, metrics), server
    )
    extproc = ExternalProcessorServicer(enforcer, metrics)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(extproc, server)
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
    server.add_insecure_port(opts.grpc_address)

    ready = False
    admin = AdminServer(metrics, lambda: ready)
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

    await enforcer.start()
    await server.start()
    await admin.start(*_split(opts.http_address))
    for name in (
        "",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tasks = [
        asyncio.create_task(store.watch(opts.watch_interval_s)),
        asyncio.create_task(_every(opts.sweep_interval_s, sweep)),
    ]
    ready = True
    log.info(
        "serving",
        extra={
            "grpc": opts.grpc_address,
            "http": opts.http_address,
            "policy": opts.config,
            "ledger": ledger.__class__.__name__,
        },
    )
    await stop.wait()

    log.info("stopping: no new checks, finishing in-flight requests")
    ready = False
    await health_servicer.enter_graceful_shutdown()
    await server.stop(opts.grace_s)  # refuses new RPCs, waits for running ones
    await extproc.drain()
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
    await sweep()
    await ledger.close()
    await enforcer.aclose()
    await admin.stop()
    log.info("stopped")
