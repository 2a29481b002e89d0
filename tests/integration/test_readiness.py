"""``/readyz`` tells the truth about the ledger, on the real ``authz serve`` and real Redis.

Before, a wrong Redis URL started "ready" and then answered 503 to every request: a
rollout replaced working replicas with useless ones. Now a replica is ready once its
ledger has answered, and not while its breaker is open in ``fail_closed`` (it would
only answer 503); with ``fail_open`` it stays in, "degraded". Recovery needs no traffic:
the readiness check's own ping is the breaker's half-open probe.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.proto import external_auth_pb2_grpc
from tests.hostile.test_grpc_mtls import check_request
from tests.support.ports import free_port
from tests.support.procs import HarnessError, wait_until
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService

pytestmark = pytest.mark.integration

KEY = "sk-ready"
POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: a, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: a}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: day, match: {{org: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
ledger:
  url: URL
  breaker: {{failures: 2, open_s: 0.5, mode: MODE}}
"""


class LiveService(AuthzService):
    """Started once it is alive (/healthz), ready or not: readiness is under test."""

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                raise HarnessError(
                    f"authz exited with {self._proc.returncode}:\n{self.stderr_tail()}"
                )
            try:
                if self._get("/healthz", timeout=1.0)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise HarnessError(f"authz not alive:\n{self.stderr_tail()}")
            time.sleep(0.05)


def readyz(svc: AuthzService) -> tuple[int, dict[str, Any]]:
    status, body = svc.http_get("/readyz")
    return status, json.loads(body)


def wait_readyz(
    svc: AuthzService, status: int, label: str | None = None, timeout: float = 15.0
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        code, body = readyz(svc)
        return body if code == status and label in (None, body["status"]) else None

    return wait_until(reached, timeout=timeout, what=f"/readyz {status} {label}", interval=0.05)


def policy(tmp: Path, url: str, mode: str = "fail_closed") -> Path:
    path = tmp / "policy.yaml"
    path.write_text(POLICY.replace("URL", url).replace("MODE", mode))
    return path


def allowed(svc: AuthzService) -> bool:
    with grpc.insecure_channel(svc.grpc_address) as ch:
        reply = external_auth_pb2_grpc.AuthorizationStub(ch).Check(
            check_request({"authorization": f"Bearer {KEY}"}), timeout=5
        )
    return bool(reply.status.code == 0)


def test_wrong_redis_url_is_not_ready_until_redis_answers(tmp_path: Path) -> None:
    port = free_port()
    with LiveService(policy(tmp_path, f"redis://127.0.0.1:{port}/0"), workdir=tmp_path) as svc:
        body = wait_readyz(svc, 503)  # alive, but nothing answers at that URL
        assert body["status"] == "not ready" and "ledger" in body["reason"]
        time.sleep(1.0)  # it stays so (a probe period or two), it does not flip to ready
        assert readyz(svc)[0] == 503
        with RedisServer(tmp_path / "redis", port=port):
            body = wait_readyz(svc, 200)  # no request needed: the readiness ping probes
            assert body["status"] == "ready" and body["ledger"]["state"] == "closed"
            assert allowed(svc)


@pytest.mark.parametrize(("mode", "down"), [("fail_closed", 503), ("fail_open", 200)])
def test_lost_redis_fails_readiness_only_in_fail_closed(
    tmp_path: Path, mode: str, down: int
) -> None:
    redis = RedisServer(tmp_path / "redis")
    with redis, LiveService(policy(tmp_path, redis.url, mode), workdir=tmp_path) as svc:
        wait_readyz(svc, 200)
        redis.stop()  # no traffic at all: the readiness pings notice
        body = wait_until(
            lambda: (r := readyz(svc))[1]["ledger"]["state"] != "closed" and r,
            timeout=15,
            what="the breaker to open",
        )
        assert body[0] == down
        assert body[1]["status"] == ("not ready" if down == 503 else "degraded")
        redis.start()
        assert wait_readyz(svc, 200, "ready")["ledger"]["state"] == "closed"
        assert allowed(svc)
