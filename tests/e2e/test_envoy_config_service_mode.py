"""``authz envoy-config --mode service,mtls`` through the real Envoy and the real service.

The service as a separate deployment: Envoy finds it by DNS name (``localhost`` here,
a headless Service in Kubernetes), health-checks it over gRPC, and reaches it with a
client certificate. A request is allowed (and settled), the next one denied with the
429 the SDK raises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from authz.envoyconf.command import render
from authz.envoyconf.options import Options, parse_modes
from tests.e2e.spine_env import wait_metric
from tests.support.certs import TestCA
from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLM, FakeLLMThread
from tests.support.ports import free_port
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e

KEY = "sk-service-mode"
POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: gw, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000, period: day, over_reserve: deny}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 4096}}]
"""


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMThread]:
    with FakeLLM.run_in_thread() as fake:
        yield fake


def test_service_mode_with_mtls_allows_then_denies(tmp_path: Path, fake_llm: FakeLLMThread) -> None:
    ca = TestCA()
    server_cert, server_key = ca.issue("authz", server=True).write(
        tmp_path, "server"
    )  # SAN localhost too
    client_cert, client_key = ca.issue("envoy-gateway").write(tmp_path, "client")
    ca_path = ca.write(tmp_path / "ca.crt")
    (tmp_path / "policy.yaml").write_text(POLICY)
    grpc_port = free_port()
    tls = [
        "--tls-cert",
        str(server_cert),
        "--tls-key",
        str(server_key),
        "--tls-client-ca",
        str(ca_path),
    ]
    with AuthzService(
        tmp_path / "policy.yaml", grpc_port=grpc_port, workdir=tmp_path, extra_args=tls
    ) as svc:
        opts = Options(
            modes=parse_modes("service,mtls"),
            grpc_address=("localhost", grpc_port),
            tls_cert=str(client_cert),
            tls_key=str(client_key),
            tls_ca=str(ca_path),
            listen=("127.0.0.1", free_port()),
            admin=("127.0.0.1", free_port()),
            upstream=("127.0.0.1", fake_llm.port),
        )
        config = tmp_path / "envoy.yaml"
        config.write_text(
            render(opts, whole=True, command="authz envoy-config --bootstrap --mode service,mtls")
        )
        with EnvoyProcess(config, workdir=tmp_path) as envoy:
            client = closing(
                openai.OpenAI(
                    base_url=envoy.url + "/v1",
                    api_key=KEY,
                    max_retries=0,
                    timeout=20,
                    default_headers={"x-fake-words": "5", "x-fake-prompt-tokens": "7"},
                )
            )
            client.chat.completions.create(
                model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
            assert fake_llm.wait_records(1)[0].headers["x-authz-subject"] == "org:acme/user:ann"
            assert (
                wait_metric(svc.http_url, "authz_tokens_total", 5, kind="output", org="acme") == 5
            )
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(
                    model="gpt-4o", max_tokens=5000, messages=[{"role": "user", "content": "hi"}]
                )
            assert len(fake_llm.records) == 1  # the denied request never reached upstream
            hc = envoy.stats("cluster.authz.health_check.")
            assert hc["cluster.authz.health_check.success"] >= 1, hc
