"""Attacks on the HTTP check port (authz/httpcheck): forged, altered and replayed
handles on /settle, callers without the gateway's certificate, plaintext off loopback,
oversized input. Against the real service process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from authz.handle_token import decode_token, encode_token
from authz.handles import HandleKeys
from tests.e2e.spine_env import metric
from tests.support.certs import TestCA
from tests.support.ports import free_port
from tests.support.service import REPO_ROOT, AuthzService

pytestmark = pytest.mark.integration

KEY = "sk-hostile-http"
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: k, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
bounds:
  response_decoded_bytes: 65536
"""
BODY = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
USAGE = {"object": "chat.completion", "choices": [],
         "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}  # fmt: skip


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzService]:
    tmp = tmp_path_factory.mktemp("http-trust")
    (tmp / "policy.yaml").write_text(POLICY)
    with AuthzService(tmp / "policy.yaml", workdir=tmp) as s:
        yield s


def reserve(url: str, **kw: object) -> str:
    with httpx.Client(base_url=url, timeout=20, **kw) as c:  # type: ignore[arg-type]
        resp = c.post("/check/v1/chat/completions", json=BODY,
                      headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    return resp.headers["x-authz-handle"]


def settle(url: str, handle: str, body: bytes | None = None, **kw: object) -> httpx.Response:
    headers = {"x-authz-handle": handle, "x-authz-upstream-status": "200",
               "x-authz-upstream-content-type": "application/json", "x-authz-complete": "true"}
    with httpx.Client(base_url=url, timeout=20, **kw) as c:  # type: ignore[arg-type]
        return c.post("/settle", content=json.dumps(USAGE).encode() if body is None else body,
                      headers=headers)  # fmt: skip


def _altered(handle: str, index: int, value: object) -> str:
    """The same MAC over fields changed by someone who decoded the handle."""
    _, body, mac = handle.split(".")
    fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    fields[index] = value
    raw = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    return f"h1.{raw}.{mac}"


def _charged(svc: AuthzService) -> float:
    return metric(svc.http_url, "authz_tokens_total", org="acme")


def test_forged_and_altered_handles_are_403_and_charge_nothing(svc: AuthzService) -> None:
    handle = reserve(svc.check_http_url)
    found = decode_token(handle)
    assert isinstance(found, tuple)
    before = _charged(svc), metric(svc.http_url, "authz_settlements_total")
    refused = metric(svc.http_url, "authz_settle_refused_total", reason="forged")
    other_key = HandleKeys.random()  # a handle signed by anyone but this service
    forgeries = [
        _altered(handle, 6, 10**6),  # a bigger output reservation: bounds settle more
        _altered(handle, 5, 0),
        _altered(handle, 0, "0" * 32 + "@acme"),  # another reservation, same org
        handle[:-1] + ("0" if handle[-1] != "0" else "1"),  # one MAC digit off
        encode_token(found[0], other_key.sign(found[0])),
    ]
    for forged in forgeries:
        resp = settle(svc.check_http_url, forged)
        assert resp.status_code == 403, (forged, resp.text)
    assert (_charged(svc), metric(svc.http_url, "authz_settlements_total")) == before
    assert metric(svc.http_url, "authz_settle_refused_total", reason="forged") == refused + 5
    # The genuine handle still settles, exactly.
    assert settle(svc.check_http_url, handle).status_code == 204
    assert _charged(svc) == before[0] + 13


def test_replayed_settle_charges_once(svc: AuthzService) -> None:
    handle = reserve(svc.check_http_url)
    before = _charged(svc)
    dup = metric(svc.http_url, "authz_settlements_total", outcome="duplicate")
    assert settle(svc.check_http_url, handle).status_code == 204
    bigger = json.dumps({**USAGE, "usage": {"prompt_tokens": 900, "completion_tokens": 40}})
    for _ in range(3):  # replays, even with other usage, are answered and ignored
        assert settle(svc.check_http_url, handle, bigger.encode()).status_code == 204
    assert _charged(svc) == before + 13
    assert metric(svc.http_url, "authz_settlements_total", outcome="duplicate") == dup + 3


def test_malformed_handles_are_400(svc: AuthzService) -> None:
    malformed = metric(svc.http_url, "authz_settle_refused_total", reason="malformed")
    for junk in ("x", "h1." + "A" * 5000 + ".00", "h1.!!!.00", "h1.WzFd.00"):
        assert settle(svc.check_http_url, junk).status_code == 400
    assert metric(svc.http_url, "authz_settle_refused_total", reason="malformed") == malformed + 4


def test_oversized_settle_body_is_a_truncated_copy_and_headers_are_bounded(
    svc: AuthzService,
) -> None:
    handle = reserve(svc.check_http_url)
    before = _charged(svc)
    huge = json.dumps({**USAGE, "pad": "x" * 200_000}).encode()  # > 64 KiB decoded bound
    resp = settle(svc.check_http_url, handle, huge)
    assert resp.status_code == 204 and resp.headers.get("connection") == "close"
    found = decode_token(handle)
    assert isinstance(found, tuple)
    reserved = found[0].input_estimate + found[0].output_reserved
    assert _charged(svc) == before + reserved  # the reservation, not a reported number
    with httpx.Client(base_url=svc.check_http_url, timeout=20) as c:
        big = c.post("/check/v1/chat/completions", json=BODY, headers={"x-big": "y" * 40_000})
        assert big.status_code in (400, 431)


def _serve_refused(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "policy.yaml").write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "AUTHZ_STATE_DIR": str(tmp)}
    cmd = [sys.executable, "-m", "authz", "serve", "--config", str(tmp / "policy.yaml"),
           "--grpc-address", f"127.0.0.1:{free_port()}",
           "--http-address", f"127.0.0.1:{free_port()}", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_plaintext_check_port_off_loopback_is_refused(tmp_path: Path) -> None:
    address = f"0.0.0.0:{free_port()}"
    done = _serve_refused(tmp_path, "--check-http-address", address)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"authz: refusing plaintext HTTP check on {address} (not loopback)")


def test_mtls_only_the_gateway_certificate_gets_in(tmp_path: Path) -> None:
    ca, stranger = TestCA("gateway-ca"), TestCA("someone-else")
    ca.issue("authz", server=True).write(tmp_path, "server")
    ca.write(tmp_path / "ca.crt")
    gw_cert, gw_key = ca.issue("gateway").write(tmp_path, "gateway")
    other_cert, other_key = stranger.issue("gateway").write(tmp_path, "other")
    (tmp_path / "policy.yaml").write_text(POLICY)
    tls = ["--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key"),
           "--tls-client-ca", str(tmp_path / "ca.crt")]  # fmt: skip
    with AuthzService(tmp_path / "policy.yaml", workdir=tmp_path, extra_args=tls) as svc:
        url = f"https://127.0.0.1:{svc.check_http_port}"

        def client_ctx(cert: Path | None, key: Path | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            if cert is not None and key is not None:
                ctx.load_cert_chain(str(cert), str(key))
            return ctx

        handle = reserve(url, verify=client_ctx(gw_cert, gw_key))
        for cert, key in ((None, None), (other_cert, other_key)):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                settle(url, handle, verify=client_ctx(cert, key))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            settle(svc.check_http_url, handle)  # plaintext on the TLS port
        assert metric(svc.http_url, "authz_tokens_total", org="acme") == 0
        assert settle(url, handle, verify=client_ctx(gw_cert, gw_key)).status_code == 204
        assert metric(svc.http_url, "authz_tokens_total", org="acme") == 13
