"""`authz serve --workers N`: several processes answer Checks on one port (SO_REUSEPORT)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests.support.ports import free_ports_in_a_row
from tests.support.procs import wait_until
from tests.support.service import REPO_ROOT, AuthzService

pytestmark = pytest.mark.integration
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

KEY = "sk-workers"
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: w, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""


def _request() -> external_auth_pb2.CheckRequest:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": []}).encode()
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path="/v1/chat/completions",
        raw_body=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def _ready(admin_port: int) -> bool:
    try:
        with _OPENER.open(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _allowed(admin_port: int) -> float:
    """Checks allowed by the worker whose admin API is on ``admin_port``."""
    with _OPENER.open(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "authz_decisions_total" and sample.labels["verdict"] == "allow":
                total += sample.value
    return total


def test_two_workers_answer_on_one_port(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    args = ["--workers", "2", "--split-memory-ledger", "--log-level", "warning"]
    svc = AuthzService(
        tmp_path / "policy.yaml",
        http_port=free_ports_in_a_row(2),
        extra_args=args,
        workdir=tmp_path,
    )
    with svc:
        wait_until(lambda: _ready(svc.http_port + 1), timeout=20, what="worker 1 ready")
        # Each channel with its own subchannel pool is a new TCP connection, which the
        # kernel hashes to one of the two sockets: 16 of them all landing on one worker
        # has a chance of 2**-15.
        for _ in range(16):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(svc.grpc_address, options=options) as ch:
                resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(_request(), timeout=10)
                assert resp.status.code == 0, svc.stderr_tail()
        # Worker i serves its admin API on the given port + i.
        counts = [_allowed(svc.http_port), _allowed(svc.http_port + 1)]
        assert sum(counts) == 16
        assert all(c > 0 for c in counts), counts
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(15) == 0


def test_workers_refuse_the_memory_ledger_without_opt_in(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    cmd = [sys.executable, "-m", "authz", "serve", "--config", str(tmp_path / "policy.yaml"),
           "--grpc-address", "127.0.0.1:1", "--workers", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    assert done.returncode == 2
    assert "memory:// ledger would give every worker its own separate budgets" in done.stderr
