"""Where the service listens, and the set-ups it refuses to start with.

The gRPC port decides and settles budgets, so who can reach it matters more than any
check behind it. The rules, checked before anything binds:

- the default addresses are loopback (127.0.0.1): the sidecar layout, where only the
  pod's own Envoy reaches the service;
- plaintext gRPC on any other address needs ``--insecure-plaintext`` and says so at
  start; without mTLS and without that flag the service does not start;
- ``identity.source: envoy_jwt_authn`` believes the jwt_authn payload a caller sends,
  so it needs mTLS, loopback included (another container of the pod can reach
  loopback too), unless the policy states ``identity.trust_network: true``; a reload
  that would break this rule is refused like any invalid policy.

A port already taken is one line naming the address (:class:`AddressInUse`), found by
binding a probe socket first: gRPC's own bind failure says only "Failed to bind" and
prints C-core log lines, and with ``localhost`` it even succeeds on one of ::1 and
127.0.0.1 while the other is taken.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable

from authz.errors import AddressInUse, AuthzError, PolicyError
from authz.policy.model import Policy

__all__ = ["check_transport", "ensure_free", "is_local", "jwt_authn_guard"]

log = logging.getLogger("authz.listen")


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise AuthzError(f"address {address!r} is not HOST:PORT") from None


def is_local(address: str) -> bool:
    """Loopback (127.0.0.0/8, ::1, localhost) or a unix socket: unreachable off the host."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host, _ = _host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, "" or "*": it may well be reachable
        return False


def jwt_authn_guard(policy_file: str, *, mtls: bool) -> Callable[[Policy], None]:
    """A check for the policy at start and on every reload (raises :class:`PolicyError`)."""

    def check(policy: Policy) -> None:
        identity = policy.identity
        if identity.source == "envoy_jwt_authn" and not mtls and not identity.trust_network:
            raise PolicyError(
                policy_file,
                "identity.source",
                "envoy_jwt_authn takes any caller of the gRPC port at its word: turn on mTLS"
                " (--tls-cert, --tls-key, --tls-client-ca) or set identity.trust_network: true"
                " (got envoy_jwt_authn)",
            )

    return check


def check_transport(
    grpc_address: str, *, mtls: bool, insecure_plaintext: bool, what: str = "gRPC"
) -> None:
    """Refuse plaintext ``what`` (gRPC, or the HTTP check port, which follows the same
    rules) off loopback unless asked for; warn when it is."""
    if mtls and insecure_plaintext:
        raise AuthzError("--insecure-plaintext and --tls-* contradict each other: pick one")
    if mtls or is_local(grpc_address):
        return
    if not insecure_plaintext:
        raise AuthzError(
            f"refusing plaintext {what} on {grpc_address} (not loopback): anyone who reaches"
            " it could spend or settle any budget. Give --tls-cert, --tls-key and"
            " --tls-client-ca, or --insecure-plaintext (AUTHZ_INSECURE_PLAINTEXT=1) if the"
            " network itself only lets the gateway in"
        )
    log.warning(
        "plaintext %s on %s without mTLS (--insecure-plaintext): any caller that reaches"
        " this address can decide and settle budgets",
        what,
        grpc_address,
        extra={"grpc" if what == "gRPC" else "check_http": grpc_address},
    )


def ensure_free(address: str, what: str) -> None:
    """:class:`AddressInUse` if another socket listens on ``address`` (port 0 is free)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, port = _host_port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return  # the real bind reports an unknown host
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"the {what} address {address} is already in use"
                        " (another authz, or another program, listens there)"
                    ) from None
                # EADDRNOTAVAIL (no ::1 here, say): the real bind tells its own story
