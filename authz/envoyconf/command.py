"""``authz envoy-config``: the Envoy config that puts this service in the request path.

Without ``--bootstrap`` it prints the HTTP filters and clusters to paste into an existing
Envoy config; with it, a whole bootstrap (``envoy/envoy.yaml`` is
``authz envoy-config --bootstrap``). The typed Envoy messages (envoy-data-plane) are
imported only here, on demand: they take seconds to import and the service never
needs them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from authz.envoyconf.options import (
    MODES,
    EnvoyConfigError,
    Options,
    duration,
    host_port,
    parse_modes,
)

__all__ = ["add_envoy_config_command", "options_from_args", "render"]


def add_envoy_config_command(sub: Any) -> None:
    e = sub.add_parser(
        "envoy-config",
        help="print the Envoy filters and clusters (or a whole bootstrap) for this service",
        description="Envoy config for the authz service: ext_authz + ext_proc filters and"
        " the clusters that reach the service, as YAML. Modes combine, comma-separated:"
        " sidecar (default: the service on this host's loopback) or service (a DNS name"
        " with one address per replica, e.g. a headless Kubernetes Service), plus mtls,"
        " jwt_authn, http_service. Example: --mode service,mtls",
    )
    e.add_argument("--mode", action="append", default=[], help=f"any of {', '.join(MODES)}")
    e.add_argument("--bootstrap", action="store_true", help="a whole Envoy bootstrap")
    e.add_argument("--address", default="127.0.0.1:9191", help="the service's gRPC HOST:PORT")
    e.add_argument(
        "--check-http-address",
        help="http_service: the HTTP check API's HOST:PORT (default: --address host, port 9193)",
    )
    e.add_argument("--authz-timeout", default="1s", help="ext_authz timeout (default 1s)")
    e.add_argument(
        "--message-timeout", default="5s", help="ext_proc per-message timeout (default 5s)"
    )
    e.add_argument("--connect-timeout", help="default 0.25s for sidecar, 1s for service")
    e.add_argument("--tls-cert", default=Options.tls_cert, help="mtls: Envoy's client cert")
    e.add_argument("--tls-key", default=Options.tls_key, help="mtls: its private key")
    e.add_argument("--tls-ca", default=Options.tls_ca, help="mtls: CA of the service's cert")
    e.add_argument("--tls-sni", default="", help="mtls: the service's DNS SAN (default: host)")
    e.add_argument("--jwt-issuer", default=Options.jwt_issuer, help="jwt_authn: issuer")
    e.add_argument(
        "--jwt-audience", action="append", default=[], help="jwt_authn: audience (repeatable)"
    )
    e.add_argument("--jwks-uri", default=Options.jwks_uri, help="jwt_authn: the IdP's JWKS URL")
    e.add_argument("--listen", default="0.0.0.0:10000", help="bootstrap: the listener")
    e.add_argument("--admin", default="127.0.0.1:9901", help="bootstrap: Envoy's admin API")
    e.add_argument("--upstream", default="127.0.0.1:8080", help="bootstrap: the LLM upstream")
    e.add_argument("-o", "--output", help="write to this file instead of stdout")
    e.set_defaults(fn=_run)


def options_from_args(args: argparse.Namespace) -> Options:
    modes = parse_modes(",".join(args.mode) or "sidecar")
    grpc = host_port("--address", args.address)
    check = (
        host_port("--check-http-address", args.check_http_address)
        if args.check_http_address
        else (grpc[0], 9193)
    )
    return Options(
        modes=modes,
        grpc_address=grpc,
        check_http_address=check,
        authz_timeout=duration("--authz-timeout", args.authz_timeout),
        message_timeout=duration("--message-timeout", args.message_timeout),
        connect_timeout=(
            duration("--connect-timeout", args.connect_timeout) if args.connect_timeout else None
        ),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_sni=args.tls_sni,
        jwt_issuer=args.jwt_issuer,
        jwt_audiences=tuple(args.jwt_audience) or Options.jwt_audiences,
        jwks_uri=args.jwks_uri,
        listen=host_port("--listen", args.listen),
        admin=host_port("--admin", args.admin),
        upstream=host_port("--upstream", args.upstream),
    )


def render(opts: Options, *, whole: bool, command: str) -> str:
    with warnings.catch_warnings():
        # envoy-data-plane's generated classes use a pydantic decorator form that pydantic
        # >= 2.12 deprecates, once per class at import: noise for our users, not theirs.
        warnings.filterwarnings("ignore", "Using `@model_validator`", DeprecationWarning)
        from authz.envoyconf.bootstrap import bootstrap, fragment

    return bootstrap(opts, command) if whole else fragment(opts, command)


def _command(argv: list[str]) -> str:
    """The command line that made the output, for its header (without -o FILE)."""
    shown: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-o", "--output"):
            skip = True
        elif not arg.startswith(("-o", "--output=")):
            shown.append(shlex.quote(arg))
    return " ".join(["authz", *shown])


def _run(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
        text = render(opts, whole=args.bootstrap, command=_command(args.argv))
    except EnvoyConfigError as exc:
        print(f"authz envoy-config: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
