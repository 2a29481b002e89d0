"""``python -m bench micro``: the Python cost of one check, in process, phase by phase.

No Envoy, no gRPC transport: a CheckRequest shaped like Envoy's (the headers our
envoy.yaml forwards, the JSON body packed as bytes, the bench's JWTs) is handed to the
servicer directly, so what is timed is exactly our code: conversion, identity, subject,
estimate, budgets, ledger, response. Run it before and after a hot-path change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authz.handles import Handle, HandleKeys
from authz.proto import attribute_context_pb2, external_auth_pb2
from bench.scenario import REQUEST_BODY, user_token, write_policy

__all__ = ["check_request", "micro"]


def check_request(token: str) -> external_auth_pb2.CheckRequest:
    body = json.dumps(REQUEST_BODY, separators=(",", ":")).encode()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="4a5c8e9f-1d2b-4c3a-9e8f-7a6b5c4d3e2f",
        method="POST",
        path="/v1/chat/completions",
        host="127.0.0.1:10000",
        scheme="http",
        protocol="HTTP/1.1",
        size=len(body),
        headers={
            ":authority": "127.0.0.1:10000",
            ":method": "POST",
            ":path": "/v1/chat/completions",
            ":scheme": "http",
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
        },
        raw_body=body,
    )
    attrs = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)
    )
    return external_auth_pb2.CheckRequest(attributes=attrs)


HANDLE_KEYS = HandleKeys.random()


def _handle(d: Any) -> Handle:
    """The handle convert.check_response signs for decision ``d``."""
    return Handle(
        d.reservation_id, str(d.subject), d.subject.org, d.api.value, d.model or "",
        d.input_estimate, d.output_reserved, d.stream,
    )  # fmt: skip


def _timeit(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _wire(store: Any, clock: Any) -> tuple[Any, Any]:
    """The servicer and enforcer as authz/server.py wires them (tracing off: no OTEL_*)."""
    from authz.enforcer import Enforcer
    from authz.envoy.authz import AuthorizationServicer
    from authz.ledger import open_ledger
    from authz.telemetry.metrics import Metrics

    metrics = Metrics()
    keys = HANDLE_KEYS
    ledger = open_ledger("memory://", clock)
    try:
        from authz.observability import Observability
    except ImportError:  # before the observability layer
        enforcer = Enforcer(store, ledger, clock)
        return AuthorizationServicer(enforcer, metrics, handles=keys), enforcer
    obs = Observability(store, "memory://", clock, metrics, env={})
    enforcer = Enforcer(store, obs.ledger(ledger), clock, observer=obs.observer)
    servicer = AuthorizationServicer(
        enforcer, metrics, obs.tracing, obs.decision_log, handles=keys
    )
    return servicer, enforcer


async def _run(users: int, n: int, workdir: Path) -> None:
    from authz.clock import SystemClock
    from authz.envoy.convert import check_input, check_response
    from authz.policy.store import PolicyStore

    store = PolicyStore(write_policy(workdir))
    servicer, enforcer = _wire(store, SystemClock())
    reqs = [check_request(user_token(i)) for i in range(users)]
    wire = [r.SerializeToString() for r in reqs]
    key = store.current.identity.envoy_payload_key
    for r in reqs:  # warm the JWT cache: steady state is what Envoy sees
        await servicer.Check(r, None)  # type: ignore[arg-type]

    def rot(xs: list[Any]) -> Callable[[], Any]:
        it = iter(range(1 << 62))
        return lambda: xs[next(it) % len(xs)]

    nxt_wire, nxt_req = rot(wire), rot(reqs)
    inputs = [check_input(r, key) for r in reqs]
    nxt_in = rot(inputs)
    pairs = [(await enforcer.check(i), i) for i in inputs]
    nxt_pair = rot(pairs)
    nxt_handle = rot([_handle(d) for d, _ in pairs])
    loop = asyncio.get_running_loop()

    async def full_loop(kind: str) -> float:
        start = time.perf_counter()
        for _ in range(n):
            if kind == "check":
                await servicer.Check(nxt_req(), None)  # type: ignore[arg-type]
            else:
                await enforcer.check(nxt_in())
        return (time.perf_counter() - start) / n * 1e6

    rows = [
        ("parse CheckRequest (upb, as grpc does)",
         _timeit(lambda: external_auth_pb2.CheckRequest.FromString(nxt_wire()), n)),
        ("convert.check_input", _timeit(lambda: check_input(nxt_req(), key), n)),
        ("Enforcer.check (identity..ledger)", await full_loop("enforcer")),
        ("convert.check_response (allow)",
         _timeit(lambda: check_response(*nxt_pair(), HANDLE_KEYS), n)),
        ("check_response + serialize",
         _timeit(lambda: check_response(*nxt_pair(), HANDLE_KEYS).SerializeToString(), n)),
        ("  of which: sign the reservation handle",
         _timeit(lambda: HANDLE_KEYS.sign(nxt_handle()), n)),
        ("AuthorizationServicer.Check, all of it", await full_loop("check")),
    ]  # fmt: skip
    del loop
    for name, us in rows:
        print(f"  {us:8.1f} us  {name}")


def micro(args: argparse.Namespace) -> int:
    workdir = args.out / "micro"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"in-process cost per check ({args.users} users, {args.checks} checks per row):")
    asyncio.run(_run(args.users, args.checks, workdir))
    return 0
