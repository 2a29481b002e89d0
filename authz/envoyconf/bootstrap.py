"""A whole Envoy bootstrap around the authz filters: ``envoy/envoy.yaml`` is its output.

The fragment (:func:`fragment`: the HTTP filters and the clusters) is what an operator
pastes into an Envoy config of their own; :func:`bootstrap` puts the same parts into a
complete config with one listener, one route to the LLM upstream, an access log that
shows the decisions, and the optional parts (tracing, jwt_authn, TLS) shown commented
out, rendered by the same builders as the modes that turn them on.
"""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapStaticResources,
    LayeredRuntime,
    RuntimeLayer,
)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    SocketAddress,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.google.protobuf import Any, Struct

from authz.envoyconf import bootstrap_notes as bn
from authz.envoyconf.clusters import authz_clusters, static_cluster
from authz.envoyconf.filters import ext_authz, ext_proc, router
from authz.envoyconf.jwt import jwks_cluster, jwt_authn
from authz.envoyconf.optional import optional_blocks
from authz.envoyconf.options import Options
from authz.envoyconf.yaml_out import Notes, dump, message_tree, prefixed

__all__ = ["bootstrap", "fragment"]

_HCM = "envoy.filters.network.http_connection_manager"
_STDOUT = "envoy.access_loggers.stdout"


def _parts(opts: Options) -> tuple[list[HttpFilter], Notes, list[Cluster], Notes]:
    filters: list[HttpFilter] = []
    filter_notes: Notes = {}
    clusters, cluster_notes = authz_clusters(opts)
    cluster_notes = {f"clusters{k}": v for k, v in cluster_notes.items()}
    builders = [ext_authz, ext_proc]
    if "jwt_authn" in opts.modes:
        builders.insert(0, jwt_authn)
        jwks, notes = jwks_cluster(opts)
        clusters.append(jwks)
        cluster_notes.update(prefixed(f"clusters[{jwks.name}]", notes))
    for build in builders:
        http_filter, notes = build(opts)
        filters.append(http_filter)
        filter_notes.update(prefixed(f"http_filters[{http_filter.name}]", notes))
    return filters, filter_notes, clusters, cluster_notes


def fragment(opts: Options, command: str) -> str:
    """The filters and clusters only, to paste into an existing Envoy config."""
    filters, filter_notes, clusters, cluster_notes = _parts(opts)
    tree = {
        "http_filters": [message_tree(f) for f in filters],
        "clusters": [message_tree(c) for c in clusters],
    }
    notes = {**filter_notes, **cluster_notes}
    notes["http_filters"] = bn.FRAGMENT_FILTERS
    notes["clusters"] = bn.FRAGMENT_CLUSTERS
    return dump(tree, notes, header=bn.fragment_header(opts, command))


def _address(host_port: tuple[str, int]) -> Address:
    return Address(socket_address=SocketAddress(address=host_port[0], port_value=host_port[1]))


def _listener(opts: Options, filters: list[HttpFilter]) -> Listener:
    route = Route(
        match=RouteMatch(prefix="/"),
        request_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key="accept-encoding", value="identity"),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
        route=RouteAction(
            cluster="llm_upstream", timeout=timedelta(0), idle_timeout=timedelta(seconds=300)
        ),
    )
    access_log = StdoutAccessLog(
        log_format=SubstitutionFormatString(json_format=Struct.from_dict(bn.ACCESS_LOG))
    )
    hcm = HttpConnectionManager(
        stat_prefix="llm",
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        stream_idle_timeout=timedelta(seconds=300),
        access_log=[AccessLog(name=_STDOUT, typed_config=Any.pack(access_log))],
        route_config=RouteConfiguration(
            name="llm", virtual_hosts=[VirtualHost(name="llm", domains=["*"], routes=[route])]
        ),
        http_filters=[*filters, router()],
    )  # fmt: skip
    return Listener(
        name="llm_ingress",
        address=_address(opts.listen),
        per_connection_buffer_limit_bytes=16777216,
        filter_chains=[FilterChain(filters=[Filter(name=_HCM, typed_config=Any.pack(hcm))])],
    )


def bootstrap(opts: Options, command: str) -> str:
    """A complete Envoy config for these options, commented for the operator."""
    filters, filter_notes, clusters, cluster_notes = _parts(opts)
    upstream = static_cluster("llm_upstream", *opts.upstream, timedelta(seconds=2))
    config = Bootstrap(
        admin=Admin(address=_address(opts.admin)),
        static_resources=BootstrapStaticResources(
            listeners=[_listener(opts, filters)], clusters=[*clusters, upstream]
        ),
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=Any.pack(
                        DownstreamConnectionsConfig(max_active_downstream_connections=50000)
                    ),
                )
            ]
        ),
        layered_runtime=LayeredRuntime(
            layers=[
                RuntimeLayer(
                    name="static",
                    static_layer=Struct.from_dict(
                        {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True}
                    ),
                )
            ]
        ),
    )
    hcm = f"static_resources.listeners[llm_ingress].filter_chains[0].filters[{_HCM}].typed_config"
    notes = {
        **prefixed("static_resources.listeners[llm_ingress]", bn.LISTENER),
        **prefixed(hcm, bn.HCM),
        **prefixed(hcm, filter_notes),
        **prefixed("static_resources", cluster_notes),
        **bn.TOP,
    }
    notes.update(optional_blocks(opts, hcm))
    tree = message_tree(config)
    # Admin first, as operators look for it; then the rest in the proto's order.
    tree = {"admin": tree.pop("admin"), **tree}
    return dump(tree, notes, header=bn.bootstrap_header(opts, command))
