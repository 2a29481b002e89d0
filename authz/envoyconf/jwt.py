"""Envoy's jwt_authn in front of ext_authz, for ``identity.source: envoy_jwt_authn``.

Envoy then holds the IdP's keys and verifies each JWT; the verified payload goes into
the ``envoy.filters.http.jwt_authn`` metadata (``payload_in_metadata``) that ext_authz
forwards (``metadata_context_namespaces``). The service believes that payload from
whoever reaches its gRPC port, so it refuses this source without mTLS unless the
policy says ``identity.trust_network: true`` (docs/security.md).
"""

from __future__ import annotations

import urllib.parse
from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import HttpUri, TransportSocket
from envoy_data_plane.envoy.config.route.v3 import RouteMatch
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext
from envoy_data_plane.google.protobuf import Any

from authz.envoyconf.clusters import load_assignment
from authz.envoyconf.options import EnvoyConfigError, Options
from authz.envoyconf.yaml_out import Notes

__all__ = ["IDP_JWKS", "jwks_cluster", "jwt_authn"]

IDP_JWKS = "idp_jwks"
JWT_AUTHN = "envoy.filters.http.jwt_authn"


def _jwks_url(opts: Options) -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(opts.jwks_uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise EnvoyConfigError(f"--jwks-uri: an http(s):// URL (got {opts.jwks_uri!r})")
    return url


def jwt_authn(opts: Options) -> tuple[HttpFilter, Notes]:
    _jwks_url(opts)
    provider = JwtProvider(
        issuer=opts.jwt_issuer,
        audiences=list(opts.jwt_audiences),
        remote_jwks=RemoteJwks(
            http_uri=HttpUri(uri=opts.jwks_uri, cluster=IDP_JWKS, timeout=timedelta(seconds=2)),
            cache_duration=timedelta(seconds=600),
        ),
        forward=True,
        payload_in_metadata="jwt_payload",
    )
    config = JwtAuthentication(
        providers={"idp": provider},
        rules=[
            RequirementRule(
                match=RouteMatch(prefix="/"), requires=JwtRequirement(provider_name="idp")
            )
        ],
    )
    return HttpFilter(name=JWT_AUTHN, typed_config=Any.pack(config)), dict(_NOTES)


def jwks_cluster(opts: Options) -> tuple[Cluster, Notes]:
    """Where Envoy fetches the IdP's signing keys (TLS for an https:// URL)."""
    url = _jwks_url(opts)
    https = url.scheme == "https"
    cluster = Cluster(
        name=IDP_JWKS,
        type=ClusterDiscoveryType.LOGICAL_DNS,
        connect_timeout=timedelta(seconds=2),
        load_assignment=load_assignment(
            IDP_JWKS, url.hostname or "", url.port or (443 if https else 80)
        ),
    )
    if https:
        tls = UpstreamTlsContext(sni=url.hostname or "")
        cluster.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=Any.pack(tls)
        )
    return cluster, {"": "Where Envoy fetches your IdP's signing keys (jwt_authn above)."}


_NOTES: Notes = {
    "": """\
Envoy verifies JWTs instead of the service (policy: identity.source:
envoy_jwt_authn). The verified claims reach the service through ext_authz's
metadata_context_namespaces (payload_in_metadata), and forward: true keeps the
Authorization header for the service to see. The service believes that payload
from anyone who reaches its gRPC port: use mtls too, or identity.trust_network.""",
}
