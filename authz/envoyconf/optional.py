"""The optional parts a config leaves out, shown commented out where they would go.

Each block is rendered from the same typed builders as the mode that turns it on, so an
operator who uncomments one gets what ``authz envoy-config --mode ...`` would have
written, and what the tests validate with the real Envoy.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import (
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
    TransportSocket,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any

from authz.envoyconf import bootstrap_notes as bn
from authz.envoyconf.clusters import AUTHZ, load_assignment, tls_socket
from authz.envoyconf.filters import EXT_AUTHZ
from authz.envoyconf.jwt import jwks_cluster, jwt_authn
from authz.envoyconf.options import Options
from authz.envoyconf.yaml_out import Notes, commented_out, message_tree

__all__ = ["optional_blocks"]


def _tracing() -> HttpConnectionManagerTracing:
    otel = OpenTelemetryConfig(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="otel_collector"),
            timeout=timedelta(seconds=1),
        ),
        service_name="envoy",
    )
    return HttpConnectionManagerTracing(
        provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=Any.pack(otel)),
        random_sampling=Percent(value=100),
    )


def _otel_cluster() -> Cluster:
    http2 = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions()
        )
    )
    return Cluster(
        name="otel_collector",
        type=ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(http2)
        },
        load_assignment=load_assignment("otel_collector", "otel-collector", 4317),
    )


def _provider_tls() -> TransportSocket:
    return TransportSocket(
        name="envoy.transport_sockets.tls",
        typed_config=Any.pack(UpstreamTlsContext(sni="api.openai.com")),
    )


def optional_blocks(opts: Options, hcm: str) -> Notes:
    """Comments keyed where each left-out part belongs in the bootstrap tree."""
    notes: Notes = {
        f"{hcm}.stream_idle_timeout": bn.optional_tracing(
            commented_out({"tracing": message_tree(_tracing())})
        )
        + "\n"
        + bn.HCM_STREAM_IDLE,
        "static_resources.clusters[llm_upstream].$end": commented_out(
            {"transport_socket": message_tree(_provider_tls())}
        ),
    }
    extra_clusters = [_otel_cluster()]
    # jwt_authn reads a verified payload only over gRPC: no example for http_service.
    if not opts.modes & {"jwt_authn", "http_service"}:
        example = replace(opts, modes=opts.modes | {"jwt_authn"})
        jwt_filter, _ = jwt_authn(example)
        notes[f"{hcm}.http_filters[{EXT_AUTHZ}]"] = bn.optional_jwt(
            commented_out([message_tree(jwt_filter)])
        )
        extra_clusters.append(jwks_cluster(example)[0])
    notes["static_resources.clusters.$end"] = bn.optional_clusters(
        [commented_out([message_tree(c)]) for c in extra_clusters]
    )
    if "mtls" not in opts.modes:
        socket = tls_socket(replace(opts, modes=opts.modes | {"mtls"}), "h2")
        notes[f"static_resources.clusters[{AUTHZ}].$end"] = bn.optional_mtls(
            commented_out({"transport_socket": message_tree(socket)})
        )
    return notes
