"""A Check answered after its caller gave up releases its reservation (authz/envoy/unanswered.py).

Through a real in-process gRPC server and client with a deadline, as Envoy calls it:
the ledger takes the hold, the answer comes too late, and the hold must be given back
(settled with 0), not left for expiry (issue 10 finding 3).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.clock import FakeClock
from authz.enforcer import Enforcer
from authz.envoy.authz import AuthorizationServicer
from authz.handles import HandleKeys
from authz.ledger import MemoryLedger
from authz.ledger.base import SettleOutcome
from authz.policy.store import PolicyStore
from authz.proto import attribute_context_pb2, external_auth_pb2
from authz.proto import external_auth_pb2_grpc as authz_grpc
from authz.telemetry.metrics import Metrics
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

BODY = {"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


class SlowLedger(MemoryLedger):
    """Takes the hold, then answers late: ``block`` stalls the whole event loop (a starved
    process, gRPC cannot cancel the handler), else the reply is awaited (cancellable)."""

    def __init__(self, clock: FakeClock, delay_s: float, *, block: bool) -> None:
        super().__init__(clock)
        self.delay_s, self.block = delay_s, block
        self.reserved: list[str] = []
        self.settled: dict[str, TokenUsage] = {}

    async def reserve(self, reservation_id: str, *args: Any, **kwargs: Any) -> Any:
        out = await super().reserve(reservation_id, *args, **kwargs)
        self.reserved.append(reservation_id)
        if self.block:
            time.sleep(self.delay_s)  # noqa: ASYNC251 - the point: a loop that cannot run
        else:
            await asyncio.sleep(self.delay_s)
        return out

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        self.settled[reservation_id] = actual
        return await super().settle(reservation_id, actual)


def _policy(tmp_path: Path) -> Path:
    key = hashlib.sha256(b"k-ann").hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {key}, claims: {{org_id: acme, sub: ann}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
""")
    return path


def _request() -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", raw_body=json.dumps(BODY).encode(),
        headers={"authorization": "Bearer k-ann", "content-type": "application/json"},
    )  # fmt: skip
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def _call(tmp_path: Path, ledger: SlowLedger, deadline_s: float) -> grpc.StatusCode:
    """One Check over real gRPC with a ``deadline_s``; waits until the servicer is done."""
    enforcer = Enforcer(PolicyStore(_policy(tmp_path)), ledger, FakeClock())
    servicer = AuthorizationServicer(enforcer, Metrics(), handles=HandleKeys.random())
    server = grpc.aio.server()
    authz_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await authz_grpc.AuthorizationStub(channel).Check(_request(), timeout=deadline_s)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        for _ in range(200):  # the late decision and its release finish in the background
            if code == grpc.StatusCode.OK or not ledger.reserved or ledger.settled:
                break
            await asyncio.sleep(0.02)
        unanswered = getattr(servicer, "unanswered", None)  # None on the code before the fix
        if unanswered is not None:
            await unanswered.drain()
    finally:
        await server.stop(None)
        await enforcer.aclose()
    return code


async def test_an_answer_ready_after_the_deadline_gives_its_hold_back(tmp_path: Path) -> None:
    ledger = SlowLedger(FakeClock(), 0.5, block=True)
    code = await _call(tmp_path, ledger, deadline_s=0.2)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(ledger.reserved) == 1
    assert ledger.settled == {ledger.reserved[0]: TokenUsage(0, 0, 0)}


async def test_a_check_cancelled_after_the_store_took_the_hold_gives_it_back(
    tmp_path: Path,
) -> None:
    ledger = SlowLedger(FakeClock(), 0.5, block=False)
    code = await _call(tmp_path, ledger, deadline_s=0.2)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(ledger.reserved) == 1
    assert ledger.settled == {ledger.reserved[0]: TokenUsage(0, 0, 0)}


async def test_an_answer_in_time_keeps_its_hold(tmp_path: Path) -> None:
    ledger = SlowLedger(FakeClock(), 0.0, block=False)
    code = await _call(tmp_path, ledger, deadline_s=30)
    assert code == grpc.StatusCode.OK
    assert len(ledger.reserved) == 1 and ledger.settled == {}
