"""The clusters through which Envoy reaches the service, as typed messages.

``sidecar``: one STATIC endpoint on loopback. ``service``: a DNS name resolved to every
replica (STRICT_DNS; a headless Kubernetes Service answers with one address per ready
pod), because Envoy multiplexes all checks of a worker over one HTTP/2 connection per
endpoint: behind a single virtual IP every check would go to one replica. ``mtls`` adds
the client-certificate TLS the service requires off loopback (docs/security.md).
"""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCustomClusterType,
    ClusterDiscoveryType,
    ClusterLbPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    KeepaliveSettings,
    RoutingPriority,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.extensions.clusters.common.dns.v3 import DnsLookupFamily
from envoy_data_plane.envoy.extensions.clusters.dns.v3 import DnsCluster
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any

from authz.envoyconf.options import Options
from authz.envoyconf.yaml_out import Notes

__all__ = ["AUTHZ", "AUTHZ_HTTP", "MTLS_NOTE", "authz_clusters", "static_cluster", "tls_socket"]

AUTHZ = "authz"
AUTHZ_HTTP = "authz_http"
_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def load_assignment(name: str, host: str, port: int) -> ClusterLoadAssignment:
    address = Address(socket_address=SocketAddress(address=host, port_value=port))
    endpoint = LbEndpoint(endpoint=Endpoint(address=address))
    return ClusterLoadAssignment(
        cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]
    )


def static_cluster(name: str, host: str, port: int, connect: timedelta) -> Cluster:
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=connect,
        load_assignment=load_assignment(name, host, port),
    )


def tls_socket(opts: Options, alpn: str) -> TransportSocket:
    context = UpstreamTlsContext(
        sni=opts.sni,
        common_tls_context=CommonTlsContext(
            alpn_protocols=[alpn],
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=opts.tls_cert),
                    private_key=DataSource(filename=opts.tls_key),
                )
            ],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=opts.tls_ca),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.DNS,
                        matcher=StringMatcher(exact=opts.sni),
                    )
                ],
            ),
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(context))


def _cluster(opts: Options, name: str, host: str, port: int, *, grpc: bool) -> Cluster:
    if opts.service:
        # What STRICT_DNS was, in the form Envoy no longer deprecates: every address the
        # name resolves to is an endpoint (all_addresses_in_single_endpoint: false).
        dns = DnsCluster(
            dns_refresh_rate=timedelta(seconds=5), dns_lookup_family=DnsLookupFamily.V4_PREFERRED
        )
        cluster = Cluster(
            name=name,
            cluster_type=ClusterCustomClusterType(
                name="envoy.clusters.dns", typed_config=Any.pack(dns)
            ),
            connect_timeout=opts.connect,
            lb_policy=ClusterLbPolicy.LEAST_REQUEST,
            load_assignment=load_assignment(name, host, port),
            outlier_detection=OutlierDetection(
                consecutive_gateway_failure=3, interval=timedelta(seconds=5)
            ),
        )
        if grpc:
            cluster.health_checks = [
                HealthCheck(
                    timeout=timedelta(seconds=1),
                    interval=timedelta(seconds=5),
                    unhealthy_threshold=2,
                    healthy_threshold=1,
                    grpc_health_check=HealthCheckGrpcHealthCheck(
                        service_name="envoy.service.auth.v3.Authorization"
                    ),
                )
            ]
    else:
        cluster = static_cluster(name, host, port, opts.connect)
    if grpc:
        http2 = Http2ProtocolOptions()
        if opts.service:
            http2.connection_keepalive = KeepaliveSettings(
                interval=timedelta(seconds=30), timeout=timedelta(seconds=5)
            )
        explicit = HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=http2)
    else:
        explicit = HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        )
    cluster.typed_extension_protocol_options = {
        _PROTOCOL_OPTIONS: Any.pack(HttpProtocolOptions(explicit_http_config=explicit))
    }
    cluster.circuit_breakers = CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                priority=RoutingPriority.DEFAULT,
                max_requests=100000,
                max_pending_requests=100000,
                # HTTP/1.1 holds a connection per check in flight: 1024 by default.
                max_connections=None if grpc else 100000,
            )
        ]
    )
    if "mtls" in opts.modes:
        cluster.transport_socket = tls_socket(opts, "h2" if grpc else "http/1.1")
    return cluster


def authz_clusters(opts: Options) -> tuple[list[Cluster], Notes]:
    """The gRPC cluster (ext_proc, and ext_authz unless http_service), and in
    http_service mode the HTTP/1.1 cluster of the check API; with their notes."""
    host, port = opts.grpc_address
    clusters = [_cluster(opts, AUTHZ, host, port, grpc=True)]
    notes = {f"[{AUTHZ}].{k}": v for k, v in _notes(opts, grpc=True).items()}
    if "http_service" in opts.modes:
        host, port = opts.check_http_address
        clusters.append(_cluster(opts, AUTHZ_HTTP, host, port, grpc=False))
        notes.update({f"[{AUTHZ_HTTP}].{k}": v for k, v in _notes(opts, grpc=False).items()})
    return clusters, notes


def _notes(opts: Options, *, grpc: bool) -> Notes:
    what = (
        "The authz service: ext_authz Check and ext_proc Process on one gRPC port."
        if grpc
        else "The authz service's HTTP check API (ext_authz http_service)."
    )
    notes: Notes = {"": what, "circuit_breakers": _BREAKERS}
    if grpc:
        notes["typed_extension_protocol_options"] = (
            "gRPC needs HTTP/2. All checks of one Envoy worker share one connection"
            + (" per replica." if opts.service else ".")
        )
    if opts.service:
        notes["cluster_type"] = _SERVICE
        if grpc:
            notes["health_checks"] = _HEALTH
    else:
        notes["connect_timeout"] = (
            "Loopback/sidecar: a connect that takes longer means the service is not there."
        )
    if "mtls" in opts.modes:
        notes["transport_socket"] = MTLS_NOTE
    return notes


_BREAKERS = """\
Each in-flight LLM call holds an ext_proc stream open for its whole response
(minutes for a long stream), plus a Check while it starts. Envoy's default of
1024 concurrent requests per cluster would cap concurrent LLM calls near 1000
and then fail them (503 on Check); raise it to what one Envoy should carry."""

_SERVICE = """\
One endpoint per replica: DNS discovery (STRICT_DNS) keeps every address the name
resolves to (a headless Service: one per ready pod), re-resolved every dns_refresh_rate. A
ClusterIP would pin Envoy's long-lived HTTP/2 connection, and so every check, to
one pod. LEAST_REQUEST spreads the long ext_proc streams; HTTP/2 keepalive drops a
connection to a replica that vanished without closing it; outlier detection
ejects a replica that keeps failing."""

_HEALTH = """\
gRPC health: a replica that starts draining (SIGTERM) reports NOT_SERVING and
gets no new checks while it finishes its streams."""

MTLS_NOTE = """\
mTLS to the service: needed whenever it is not on this host's loopback (whoever
reaches its port can spend and settle any budget). Start the service with
--tls-cert/--tls-key/--tls-client-ca. The client certificate must chain to the
service's --tls-client-ca (use a CA that signs only gateways); the sni must be a
DNS SAN of the service's certificate, and the SAN match rejects any other server.
Envoy reads these files at start; to rotate without a restart serve them by SDS
(sds_config with path_config_source and watched_directory). The service re-reads
its own files. tests/hostile/test_grpc_mtls.py runs this block."""
