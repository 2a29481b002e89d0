"""The shipped k8s manifest keeps the ports private: gRPC over mTLS, admin off the Service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parent.parent.parent


def k8s(kind: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "k8s" / "authz.yaml").read_text())
    doc: dict[str, Any] = next(d for d in docs if d and d["kind"] == kind)
    return doc


def test_service_exposes_grpc_only() -> None:
    ports = k8s("Service")["spec"]["ports"]
    assert [p["name"] for p in ports] == ["grpc"]


def test_grpc_uses_mtls_files_from_a_secret() -> None:
    spec = k8s("Deployment")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    folder = mounts["grpc-tls"]
    assert "secret" in volumes["grpc-tls"]
    assert not any("subPath" in m for m in container["volumeMounts"] if m["name"] == "grpc-tls")
    for name in ("AUTHZ_TLS_CERT", "AUTHZ_TLS_KEY", "AUTHZ_TLS_CLIENT_CA"):
        assert env[name].startswith(folder + "/")
    assert "AUTHZ_INSECURE_PLAINTEXT" not in env


def test_envoy_yaml_ships_the_mtls_block_commented() -> None:
    from tests.hostile.test_grpc_mtls import shipped_transport_socket

    typed = shipped_transport_socket()["typed_config"]
    assert typed["@type"].endswith("UpstreamTlsContext")
    assert typed["common_tls_context"]["alpn_protocols"] == ["h2"]
    assert typed["common_tls_context"]["tls_certificates"]  # a client certificate
