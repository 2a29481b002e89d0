"""Every ``authz envoy-config`` mode is a config the real Envoy accepts.

``envoy --mode validate`` builds the whole server from the file (listeners, clusters,
TLS contexts with their files read, extensions resolved) without serving: a field
Envoy does not know, a wrong type or a missing certificate fails here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from authz.cli import main
from tests.support.certs import TestCA
from tests.support.envoy_proc import envoy_binary

pytestmark = pytest.mark.e2e

MODES = [
    "sidecar",
    "service",
    "mtls",
    "jwt_authn",
    "http_service",
    "service,mtls,http_service",
    "service,mtls,jwt_authn",
]


def _validate(path: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{path.read_text()}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_validates_in_envoy(mode: str, tmp_path: Path) -> None:
    args = ["envoy-config", "--bootstrap", "--mode", mode, "-o", str(tmp_path / "envoy.yaml")]
    if "service" in mode.split(","):
        args += ["--address", "authz.authz.svc.cluster.local:9191"]
    if "mtls" in mode:
        ca = TestCA()
        cert, key = ca.issue("envoy-gateway").write(tmp_path, "client")
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        args += ["--tls-ca", str(ca.write(tmp_path / "ca.crt"))]
    assert main(args) == 0
    _validate(tmp_path / "envoy.yaml")


def test_fragment_validates_inside_a_bootstrap(tmp_path: Path) -> None:
    """What an operator pastes: the fragment's filters and clusters, in a minimal config."""
    import yaml

    assert (
        main(
            [
                "envoy-config",
                "--mode",
                "service",
                "--address",
                "authz:9191",
                "-o",
                str(tmp_path / "f.yaml"),
            ]
        )
        == 0
    )
    fragment = yaml.safe_load((tmp_path / "f.yaml").read_text())
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mine",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "x",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ]
        },
        "http_filters": [
            *fragment["http_filters"],
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    listener = {
        "name": "mine",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    config = {"static_resources": {"listeners": [listener], "clusters": fragment["clusters"]}}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    _validate(path)
