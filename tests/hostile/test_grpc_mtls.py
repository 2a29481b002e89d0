"""Only the gateway can decide or settle: mTLS on the gRPC port, through the real Envoy.

A CA made here signs the service's certificate and Envoy's client certificate; Envoy
runs the shipped envoy/envoy.yaml with the ``transport_socket`` its ``authz`` cluster
carries commented out, turned on. A request through Envoy is checked and settled; a
direct caller without a client certificate, or with one from another CA, gets neither
Check nor Process. Before this, the port was plaintext: any caller that reached it could
reserve, settle, and (with ``identity.source: envoy_jwt_authn``) be any user.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml
from google.protobuf import struct_pb2

from authz.proto import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
    external_processor_pb2,
    external_processor_pb2_grpc,
)
from tests.e2e import conftest as e2e_fixtures
from tests.e2e.spine_env import metric, wait_metric
from tests.support.certs import Issued, TestCA
from tests.support.clients import closing
from tests.support.envoy_proc import ENVOY_YAML, EnvoyProcess, Mutator, cluster
from tests.support.fake_llm import FakeLLMThread
from tests.support.service import AuthzService

pytestmark = [pytest.mark.e2e]

KEY = "sk-mtls-test"
POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: gw, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""
SERVER_NAME = "authz"  # the SAN Envoy checks and the SNI it sends

# The real Envoy and fake LLM of tests/e2e (fixtures are found by name in this module).
authz_port = e2e_fixtures.authz_port
envoy = e2e_fixtures.envoy
fake_llm = e2e_fixtures.fake_llm
fake_llm_server = e2e_fixtures.fake_llm_server


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: TestCA
    client: Issued
    client_cert: Path
    client_key: Path

    def tls_args(self) -> list[str]:
        f = self.folder
        return ["--tls-cert", str(f / "server.crt"), "--tls-key", str(f / "server.key"),
                "--tls-client-ca", str(f / "ca.crt")]  # fmt: skip


def make_pki(folder: Path) -> Pki:
    ca = TestCA("authz-test-ca")
    ca.issue(SERVER_NAME, server=True).write(folder, "server")
    ca.write(folder / "ca.crt")
    client = ca.issue("envoy-gateway")
    cert, key = client.write(folder, "client")
    return Pki(folder, ca, client, cert, key)


def shipped_transport_socket() -> dict[str, Any]:
    """The ``transport_socket`` that envoy/envoy.yaml ships commented out in its authz
    cluster, uncommented: the test runs the block operators are told to use."""
    lines = ENVOY_YAML.read_text().splitlines()
    first = lines.index("    # transport_socket:", lines.index("  - name: authz"))
    block = []
    for line in lines[first:]:
        if not line.startswith("    #"):
            break
        block.append(line.removeprefix("    # "))
    doc: dict[str, Any] = yaml.safe_load("\n".join(block))["transport_socket"]
    return doc


def mtls_transport_socket(pki: Pki) -> dict[str, Any]:
    """The shipped block with this test's files (it names its SAN/SNI ``authz`` too)."""
    socket = shipped_transport_socket()
    tls = socket["typed_config"]["common_tls_context"]
    assert socket["typed_config"]["sni"] == SERVER_NAME
    tls["tls_certificates"][0]["certificate_chain"]["filename"] = str(pki.client_cert)
    tls["tls_certificates"][0]["private_key"]["filename"] = str(pki.client_key)
    tls["validation_context"]["trusted_ca"]["filename"] = str(pki.folder / "ca.crt")
    return socket


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def envoy_mutate(pki: Pki) -> Mutator:
    def mutate(cfg: dict[str, Any]) -> None:
        cluster(cfg, "authz")["transport_socket"] = mtls_transport_socket(pki)

    return mutate


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    authz_port: int,
    pki: Pki,
) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz-mtls")
    (workdir / "policy.yaml").write_text(POLICY)
    with AuthzService(
        workdir / "policy.yaml", grpc_port=authz_port, workdir=workdir, extra_args=pki.tls_args()
    ) as svc:
        yield svc


# ------------------------------------------------------------------ direct callers


def check_request(headers: dict[str, str], jwt_payload: dict[str, Any] | None = None) -> Any:
    body = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path="/v1/chat/completions",
        raw_body=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    attributes = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)
    )
    if jwt_payload is not None:
        payload = struct_pb2.Struct()
        payload.update({"jwt_payload": jwt_payload})
        attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(
            payload
        )
    return external_auth_pb2.CheckRequest(attributes=attributes)


def channel(address: str, ca: TestCA | None, client: Issued | None) -> grpc.Channel:
    """Plaintext if ``ca`` is None; else TLS trusting ``ca``, presenting ``client`` if any."""
    if ca is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        ca.cert_pem,
        client.key_pem if client else None,
        client.cert_pem if client else None,
    )
    return grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    )


def direct_check(address: str, ca: TestCA | None, client: Issued | None, req: Any) -> Any:
    """The CheckResponse, or the grpc.StatusCode the call failed with."""
    with channel(address, ca, client) as ch:
        try:
            return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)
        except grpc.RpcError as exc:
            return exc.code()


def direct_process(address: str, ca: TestCA | None, client: Issued | None) -> Any:
    """A forged settle: response headers for a reservation id, then a 2xx body with usage.
    The first ProcessingResponse, or the grpc.StatusCode the stream failed with."""
    metadata = struct_pb2.Struct()
    metadata.update({"reservation": "forged-reservation-id", "subject": "org:acme/user:ann"})
    headers = external_processor_pb2.ProcessingRequest(
        response_headers=external_processor_pb2.HttpHeaders()
    )
    headers.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(metadata)
    with channel(address, ca, client) as ch:
        stream = external_processor_pb2_grpc.ExternalProcessorStub(ch).Process(
            iter([headers]), timeout=5
        )
        try:
            return next(iter(stream))
        except grpc.RpcError as exc:
            return exc.code()


REFUSED = (grpc.StatusCode.UNAVAILABLE,)  # the handshake fails: no RPC ever starts


def test_request_through_envoy_is_checked_and_settled(
    envoy: EnvoyProcess,
    service: AuthzService,
    fake_llm: FakeLLMThread,
) -> None:
    client = closing(
        openai.OpenAI(
            base_url=envoy.url + "/v1",
            api_key=KEY,
            max_retries=0,
            timeout=10,
            default_headers={"x-fake-words": "7", "x-fake-prompt-tokens": "11"},
        )
    )
    client.chat.completions.create(
        model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert fake_llm.wait_records(1)[0].headers["x-authz-subject"] == "org:acme/user:ann"
    url = service.http_url
    assert wait_metric(url, "authz_tokens_total", 7, kind="output", org="acme") == 7
    assert metric(url, "authz_tokens_total", kind="input", org="acme") == 11


@pytest.mark.parametrize("who", ["plaintext", "tls-without-cert", "cert-from-another-ca"])
def test_direct_caller_without_the_gateways_cert_is_refused(
    service: AuthzService, pki: Pki, who: str
) -> None:
    ca: TestCA | None = pki.ca
    client: Issued | None = None
    if who == "plaintext":
        ca = None
    elif who == "cert-from-another-ca":
        client = TestCA("mallory-ca").issue("envoy-gateway")
    before = metric(service.http_url, "authz_decisions_total")
    req = check_request({"authorization": f"Bearer {KEY}"})
    assert direct_check(service.grpc_address, ca, client, req) in REFUSED
    assert direct_process(service.grpc_address, ca, client) in REFUSED
    assert metric(service.http_url, "authz_decisions_total") == before  # nothing decided
    # The same calls with the gateway's certificate do reach the service.
    ok = direct_check(service.grpc_address, pki.ca, pki.client, req)
    assert isinstance(ok, external_auth_pb2.CheckResponse) and ok.status.code == 0


# ------------------------------------------------------------------------ rotation


def replace_file(path: Path, data: bytes) -> None:
    """As cert-manager, a Secret's symlink swap or most tools do: a whole new file."""
    tmp = path.with_suffix(path.suffix + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_replaced_cert_files_are_used_without_restart(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "policy.yaml").write_text(POLICY)
    req = check_request({"authorization": f"Bearer {KEY}"})
    with AuthzService(tmp_path / "policy.yaml", workdir=tmp_path, extra_args=pki.tls_args()) as svc:
        pid = svc.pid
        first = direct_check(svc.grpc_address, pki.ca, pki.client, req)
        assert isinstance(first, external_auth_pb2.CheckResponse)

        # Rotate everything: a new CA signs a new server certificate and a new gateway's.
        new_ca = TestCA("authz-test-ca-2")
        new_server = new_ca.issue(SERVER_NAME, server=True)
        new_client = new_ca.issue("envoy-gateway")
        replace_file(pki.folder / "ca.crt", new_ca.cert_pem)
        replace_file(pki.folder / "server.key", new_server.key_pem)
        replace_file(pki.folder / "server.crt", new_server.cert_pem)

        rotated = direct_check(svc.grpc_address, new_ca, new_client, req)
        assert isinstance(rotated, external_auth_pb2.CheckResponse), rotated
        assert rotated.status.code == 0
        # The old gateway certificate no longer chains to the client CA (new connections).
        assert direct_check(svc.grpc_address, pki.ca, pki.client, req) in REFUSED
        assert svc.pid == pid and svc.returncode is None
        assert "tls: reloaded" in svc.stderr_text()


def test_broken_replacement_keeps_the_last_good_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "policy.yaml").write_text(POLICY)
    req = check_request({"authorization": f"Bearer {KEY}"})
    with AuthzService(tmp_path / "policy.yaml", workdir=tmp_path, extra_args=pki.tls_args()) as svc:
        # A key that does not belong to the certificate (a rotation caught half-way).
        replace_file(pki.folder / "server.key", TestCA("x").issue(SERVER_NAME).key_pem)
        ok = direct_check(svc.grpc_address, pki.ca, pki.client, req)
        assert isinstance(ok, external_auth_pb2.CheckResponse) and ok.status.code == 0
        assert "does not match the certificate" in svc.stderr_text()
