"""The ext_authz gRPC servicer: CheckRequest -> Enforcer.check -> CheckResponse."""

from __future__ import annotations

import logging

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc

from authz.enforcer import Enforcer
from authz.envoy.convert import check_input, check_response
from authz.telemetry.metrics import Metrics

__all__ = ["AuthorizationServicer"]

log = logging.getLogger("authz.check")


class AuthorizationServicer(authz_grpc.AuthorizationServicer):
    def __init__(self, enforcer: Enforcer, metrics: Metrics) -> None:
        self._enforcer = enforcer
        self._metrics = metrics

    async def Check(
        self, request: authz_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> authz_pb2.CheckResponse:
        with self._metrics.check_timer():
            inp = check_input(request, self._enforcer.policy.identity.envoy_payload_key)
            decision = await self._enforcer.check(inp)
            self._metrics.decision(decision)
            if log.isEnabledFor(logging.DEBUG) or not decision.allowed:
                log.info(
                    "decision",
                    extra={
                        "decision": decision.verdict.value,
                        "reason": decision.reason.value if decision.reason else None,
                        "subject": str(decision.subject) if decision.subject else None,
                        "model": decision.model,
                        "status": decision.status,
                    },
                )
            return check_response(decision, inp)
