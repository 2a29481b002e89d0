"""Envoy on envoy/envoy-http-service.yaml: ext_authz over HTTP to the service's check
port, ext_proc over gRPC, with only the socket addresses rewritten."""

from __future__ import annotations

from pathlib import Path

from tests.support.envoy_proc import (
    REPO_ROOT,
    Config,
    cluster,
    http_filter,
    render_envoy_config,
)
from tests.support.service import AuthzService

HTTP_SERVICE_YAML = REPO_ROOT / "envoy" / "envoy-http-service.yaml"


def render_http_service(svc: AuthzService, upstream_port: int, out_path: Path) -> Path:
    def point_check_port(cfg: Config) -> None:
        [group] = cluster(cfg, "authz_http")["load_assignment"]["endpoints"]
        for lb in group["lb_endpoints"]:
            lb["endpoint"]["address"]["socket_address"] = {
                "address": "127.0.0.1",
                "port_value": svc.check_http_port,
            }
        ext_authz = http_filter(cfg, "envoy.filters.http.ext_authz")
        ext_authz["http_service"]["server_uri"]["uri"] = svc.check_http_url

    return render_envoy_config(
        listen_port=0, admin_port=0, authz_port=svc.grpc_port, upstream_port=upstream_port,
        out_path=out_path, mutate=point_check_port, source=HTTP_SERVICE_YAML,
    )  # fmt: skip
