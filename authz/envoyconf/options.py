"""What ``authz envoy-config`` is asked for: where the service is and how Envoy reaches it.

Modes combine: a placement (``sidecar``: the service on this host's loopback, or
``service``: a DNS name with one address per replica, e.g. a headless Kubernetes
Service) plus any of ``mtls`` (TLS with a client certificate to the service),
``jwt_authn`` (Envoy verifies JWTs, the service reads the verified payload) and
``http_service`` (ext_authz over the service's HTTP check API instead of gRPC). Bad input
is refused here, with the flag and the value, before any config is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from authz.errors import AuthzError

__all__ = ["MODES", "EnvoyConfigError", "Options", "duration", "host_port", "parse_modes"]

MODES = ("sidecar", "service", "mtls", "jwt_authn", "http_service")


class EnvoyConfigError(AuthzError):
    """An ``envoy-config`` option that cannot make a valid Envoy config."""


def duration(flag: str, text: str) -> timedelta:
    """``1s``, ``250ms``, ``0.5s`` or a bare number of seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)?", text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise EnvoyConfigError(f"{flag}: a positive duration such as 1s or 250ms (got {text!r})")
    value = float(m.group(1))
    return timedelta(milliseconds=value) if m.group(2) == "ms" else timedelta(seconds=value)


def host_port(flag: str, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnvoyConfigError(f"{flag}: HOST:PORT (got {text!r})")
    return host, int(port)


def parse_modes(text: str) -> frozenset[str]:
    modes = frozenset(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(modes - set(MODES))
    if unknown:
        raise EnvoyConfigError(f"--mode: one or more of {', '.join(MODES)} (got {unknown[0]!r})")
    if {"sidecar", "service"} <= modes:
        raise EnvoyConfigError(f"--mode: sidecar or service, not both (got {text!r})")
    if {"jwt_authn", "http_service"} <= modes:
        # The HTTP check request has no place for Envoy's metadata: the verified payload
        # would never reach the service.
        raise EnvoyConfigError(
            f"--mode: jwt_authn needs the gRPC check; http_service cannot carry the verified"
            f" JWT payload (got {text!r})"
        )
    return modes if modes & {"sidecar", "service"} else modes | {"sidecar"}


@dataclass(frozen=True)
class Options:
    modes: frozenset[str] = frozenset({"sidecar"})
    grpc_address: tuple[str, int] = ("127.0.0.1", 9191)
    check_http_address: tuple[str, int] = ("127.0.0.1", 9193)
    authz_timeout: timedelta = timedelta(seconds=1)
    message_timeout: timedelta = timedelta(seconds=5)
    # 0.25 s on loopback (a slower connect means nobody is there); 1 s across a network.
    connect_timeout: timedelta | None = None
    tls_cert: str = "/etc/envoy/authz-tls/tls.crt"
    tls_key: str = "/etc/envoy/authz-tls/tls.key"
    tls_ca: str = "/etc/envoy/authz-tls/ca.crt"
    tls_sni: str = ""  # default: the service's host name (sidecar: "authz")
    jwt_issuer: str = "https://issuer.example"
    jwt_audiences: tuple[str, ...] = ("llm-gateway",)
    jwks_uri: str = "https://issuer.example/.well-known/jwks.json"
    listen: tuple[str, int] = ("0.0.0.0", 10000)
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    upstream: tuple[str, int] = ("127.0.0.1", 8080)

    def __post_init__(self) -> None:
        for flag, (host, _) in (
            ("--address", self.grpc_address),
            ("--check-http-address", self.check_http_address),
        ):
            if not self.service and not _is_ip(host):
                # A STATIC cluster takes addresses only; a name needs DNS discovery.
                raise EnvoyConfigError(
                    f"{flag}: sidecar mode needs an IP address such as 127.0.0.1; for a DNS"
                    f" name use --mode service (got {host!r})"
                )

    @property
    def service(self) -> bool:
        return "service" in self.modes

    @property
    def sni(self) -> str:
        if self.tls_sni:
            return self.tls_sni
        host = self.grpc_address[0]
        return host if self.service and not _is_ip(host) else "authz"

    @property
    def connect(self) -> timedelta:
        if self.connect_timeout is not None:
            return self.connect_timeout
        return timedelta(seconds=1) if self.service else timedelta(milliseconds=250)


def _is_ip(host: str) -> bool:
    return bool(re.fullmatch(r"[\d.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", host))
