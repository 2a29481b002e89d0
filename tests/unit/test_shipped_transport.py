"""The shipped k8s base keeps the ports private: gRPC and HTTP check over mTLS, admin only
on the metrics Service (k8s/base, rendered by kubectl kustomize)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.render import find, render

pytestmark = pytest.mark.unit


def k8s(kind: str, name: str = "authz") -> dict[str, Any]:
    return find(render("base"), kind, name)


def test_service_exposes_grpc_only() -> None:
    for name in ("authz", "authz-headless"):  # what gateways dial: never the admin port
        ports = k8s("Service", name)["spec"]["ports"]
        assert [p["name"] for p in ports] == ["grpc", "check-http"]
    assert [p["port"] for p in k8s("Service", "authz-metrics")["spec"]["ports"]] == [9192]


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
