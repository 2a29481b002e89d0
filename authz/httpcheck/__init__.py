"""The HTTP check API: Envoy's ext_authz ``http_service`` protocol and a settle endpoint.

A sibling edge of :mod:`authz.envoy` for gateways without a gRPC client (Kong) and for
Envoy's ``http_service`` mode. It decides and settles nothing itself: the gRPC
servicers do, so both protocols give the same answers (docs/http-api.md).
"""

from authz.httpcheck.server import CheckHttpServer

__all__ = ["CheckHttpServer"]
