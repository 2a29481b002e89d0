"""A forged jwt_authn payload: a direct Check claiming to be any user.

With ``identity.source: envoy_jwt_authn`` the service believes the payload found in the
CheckRequest's jwt_authn metadata: that is the design (Envoy verified the JWT), and the
reason only Envoy may call. Before, a plaintext Check with a made-up payload from any
caller on the network was allowed as that user. Now the service does not start in that
mode without mTLS or ``identity.trust_network`` (tests/hostile/test_listen_safety.py),
and with mTLS the forged call never gets past the handshake.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.proto import external_auth_pb2
from tests.hostile.test_grpc_mtls import REFUSED, Pki, check_request, direct_check, make_pki
from tests.support.certs import TestCA
from tests.support.service import AuthzService

pytestmark = [pytest.mark.integration]

POLICY = """
version: 1
identity:
  source: envoy_jwt_authn
subject:
  org: {claim: org_id}
  leaf: [{level: user, claim: sub}]
budgets:
  - {name: day, match: {org: "*"}, tokens: 1000, period: day}
models:
  rules: [{match: "gpt-*", max_output_tokens: 10}]
"""
FORGED = {"iss": "https://idp.test/", "sub": "ceo", "org_id": "acme"}  # nobody signed this


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz-jwt-authn-mtls")
    (workdir / "policy.yaml").write_text(POLICY)
    with AuthzService(workdir / "policy.yaml", workdir=workdir, extra_args=pki.tls_args()) as svc:
        yield svc


@pytest.mark.parametrize("who", ["plaintext", "tls-without-cert", "cert-from-another-ca"])
def test_forged_payload_cannot_reach_the_service(service: AuthzService, pki: Pki, who: str) -> None:
    ca: TestCA | None = None if who == "plaintext" else pki.ca
    client = TestCA("mallory").issue("envoy") if who == "cert-from-another-ca" else None
    forged = check_request({}, jwt_payload=FORGED)
    assert direct_check(service.grpc_address, ca, client, forged) in REFUSED


def test_only_the_gateway_presents_a_payload(service: AuthzService, pki: Pki) -> None:
    # The control: the payload is what decides, so the certificate is the whole defence.
    ok = direct_check(service.grpc_address, pki.ca, pki.client, check_request({}, FORGED))
    assert isinstance(ok, external_auth_pb2.CheckResponse) and ok.status.code == 0


def test_plaintext_envoy_jwt_authn_needs_trust_network(tmp_path: Path) -> None:
    from tests.hostile.test_listen_safety import serve

    result = serve(tmp_path, POLICY)
    assert result.returncode == 2 and "identity.trust_network" in result.stderr
