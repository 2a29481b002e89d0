"""Out of the box nobody off the host can decide or settle, and start-up says why it stops.

The real ``authz serve`` process: plaintext gRPC off loopback needs ``--insecure-plaintext``
(and warns); ``identity.source: envoy_jwt_authn`` needs mTLS or ``trust_network``, at start
and on reload; a taken port is one line on stderr and exit code 3. Before, the ports
bound 0.0.0.0 by default, anything started plaintext, and a taken port was a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz import cli
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.service import REPO_ROOT, AuthzService

pytestmark = [pytest.mark.integration]

KEY = "sk-listen"
POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: a, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: a}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: day, match: {{org: "*"}}, tokens: 1000, period: day}}
"""
JWT_AUTHN_POLICY = """
version: 1
identity:
  source: envoy_jwt_authn
subject:
  org: {claim: org_id}
  leaf: [{level: user, claim: sub}]
budgets:
  - {name: day, match: {org: "*"}, tokens: 1000, period: day}
"""


def serve(tmp: Path, policy: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``authz serve`` expected to refuse to start: its exit code and output."""
    path = tmp / "policy.yaml"
    path.write_text(policy)
    cmd = [sys.executable, "-m", "authz", "serve", "--config", str(path),
           "--grpc-address", f"127.0.0.1:{free_port()}",
           "--http-address", f"127.0.0.1:{free_port()}",
           "--check-http-address", f"127.0.0.1:{free_port()}", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "AUTHZ_STATE_DIR": str(tmp)}
    for name in ("AUTHZ_TLS_CERT", "AUTHZ_TLS_KEY", "AUTHZ_TLS_CLIENT_CA"):
        env.pop(name, None)
    env.pop("AUTHZ_INSECURE_PLAINTEXT", None)
    # A service that starts after all would run forever: the timeout fails the test.
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("authz: ") and "Traceback" not in result.stderr
    return lines[0]


def test_defaults_listen_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []

    async def fake_serve(opts: Any) -> None:
        seen.append(opts)

    for name in ("AUTHZ_GRPC_ADDRESS", "AUTHZ_HTTP_ADDRESS", "AUTHZ_INSECURE_PLAINTEXT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("authz.server.serve", fake_serve)
    monkeypatch.setattr("authz.telemetry.logging.setup_logging", lambda level: None)
    (tmp_path / "policy.yaml").write_text(POLICY)
    assert cli.main(["serve", "--config", str(tmp_path / "policy.yaml")]) == 0
    opts = seen[0]
    assert opts.grpc_address == "127.0.0.1:9191" and opts.http_address == "127.0.0.1:9192"
    assert opts.tls is None and opts.insecure_plaintext is False


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_plaintext_off_loopback_is_refused(tmp_path: Path, host: str) -> None:
    address = f"{host}:{free_port()}"
    result = serve(tmp_path, POLICY, "--grpc-address", address)
    assert result.returncode == 2
    assert f"refusing plaintext gRPC on {address}" in one_line(result)


def test_insecure_plaintext_flag_starts_and_warns(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    address = f"0.0.0.0:{free_port()}"
    args = ["--grpc-address", address, "--insecure-plaintext"]
    with AuthzService(tmp_path / "policy.yaml", workdir=tmp_path, extra_args=args) as svc:
        warnings = [
            json.loads(line)
            for line in svc.stderr_text().splitlines()
            if line.startswith("{") and "plaintext gRPC" in line
        ]
        assert len(warnings) == 1 and warnings[0]["level"].lower().startswith("warn")
        assert address in warnings[0]["msg"]


def test_half_the_tls_flags_is_refused(tmp_path: Path) -> None:
    result = serve(tmp_path, POLICY, "--tls-cert", str(tmp_path / "x.crt"))
    assert result.returncode == 2 and "missing --tls-key, --tls-client-ca" in one_line(result)


def test_envoy_jwt_authn_without_mtls_refuses_to_start(tmp_path: Path) -> None:
    # The attack it prevents: a direct Check carrying a made-up jwt_authn payload was
    # allowed as any user (tests/hostile/test_forged_jwt_authn.py).
    result = serve(tmp_path, JWT_AUTHN_POLICY)
    assert result.returncode == 2
    line = one_line(result)
    assert f"{tmp_path / 'policy.yaml'}:identity.source: envoy_jwt_authn" in line
    assert "trust_network" in line and "--tls-cert" in line


def test_reload_into_untrusted_envoy_jwt_authn_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    trusted = JWT_AUTHN_POLICY.replace(
        "  source: envoy_jwt_authn\n", "  source: envoy_jwt_authn\n  trust_network: true\n"
    )
    policy.write_text(trusted)
    with AuthzService(policy, workdir=tmp_path) as svc:
        policy.write_text(JWT_AUTHN_POLICY)  # the file watcher reloads within a second
        wait_until(
            lambda: "identity.trust_network" in svc.stderr_text(),
            timeout=10,
            what="the refused reload in the log",
        )
        assert "keeping the last good policy" in svc.stderr_text()
        assert svc.returncode is None


# ---------------------------------------------------------------- a port already taken


@pytest.fixture
def taken() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    ("flag", "what"), [("--grpc-address", "gRPC"), ("--http-address", "admin HTTP")]
)
def test_port_in_use_is_one_line_and_exit_3(
    tmp_path: Path, taken: str, flag: str, what: str
) -> None:
    result = serve(tmp_path, POLICY, flag, taken)
    assert f"the {what} address {taken} is already in use" in one_line(result)
    assert result.returncode == 3  # not 2: nothing is wrong with the configuration
