"""``authz serve``, ``authz check-config``, ``authz hash-key``."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from authz.cli_env import ENV_EPILOG, apply_env
from authz.errors import AddressInUse, AuthzError, PolicyError

__all__ = ["main"]

EXIT_ADDRESS_IN_USE = 3  # distinct from 2 (bad configuration): retrying later may work


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    try:
        return importlib.metadata.version("authz")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _serve(args: argparse.Namespace) -> int:
    from authz.server import ServeOptions, serve
    from authz.telemetry.logging import setup_logging

    setup_logging(args.log_level)
    if args.workers < 1:
        print("authz: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        return _supervise(args)
    from authz.tls import tls_files

    try:
        tls = tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    except AuthzError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    opts = ServeOptions(
        config=args.config,
        grpc_address=args.grpc_address,
        http_address=args.http_address,
        check_http_address=args.check_http_address,
        ledger_url=args.ledger,
        reuse_port=args.worker_index is not None,
        state_dir=args.state_dir,
        tls=tls,
        insecure_plaintext=args.insecure_plaintext,
        handle_key_file=args.handle_key_file,
        grace_s=args.drain_timeout,
        manage_address=args.manage_address,
    )
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    try:
        runner(serve(opts))
    except AddressInUse as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE
    except AuthzError as exc:  # a bad policy, ledger URL or journal: say it, no traceback
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    return 0


def _supervise(args: argparse.Namespace) -> int:
    """``--workers N``: start N ``serve`` processes sharing the gRPC port, and wait."""
    from authz.policy.loader import load_policy
    from authz.workers import admin_address, supervise

    try:
        url = args.ledger or load_policy(args.config).ledger_url
    except PolicyError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    if args.grpc_address.endswith(":0"):
        print("authz: --workers needs a fixed --grpc-address port to share", file=sys.stderr)
        return 2
    if url.startswith("memory://") and not args.split_memory_ledger:
        print(
            f"authz: --workers {args.workers} with the memory:// ledger would give every worker"
            " its own separate budgets, so a caller could spend up to"
            f" {args.workers} times its allowance. Use a shared ledger (--ledger redis://...),"
            " or --workers 1, or pass --split-memory-ledger if that is what you want"
            " (benchmarks, tests).",
            file=sys.stderr,
        )
        return 2
    if url.startswith("sqlite:"):
        # One file serves one process (it is locked); a file per worker would split the
        # budgets as memory:// does, and the next start would not find them where it looks.
        print(
            f"authz: --workers {args.workers} with the sqlite ledger: its file serves one"
            " process. Use --workers 1, or a shared ledger (--ledger redis://...).",
            file=sys.stderr,
        )
        return 2
    commands = []
    for i in range(args.workers):
        # Each worker journals (and on restart replays) only what it missed itself: one
        # shared journal would be replayed once per worker.
        state_dir = os.path.join(args.state_dir, f"worker-{i}")  # the journal creates it
        cmd = [
            sys.executable, "-m", "authz", "serve",
            "--config", args.config,
            "--grpc-address", args.grpc_address,
            "--http-address", admin_address(args.http_address, i),
            "--check-http-address", args.check_http_address,
            # One management listener (the first worker's); every worker applies allocations.
            "--manage-address", args.manage_address if i == 0 else "",
            "--log-level", args.log_level,
            "--worker-index", str(i),
            "--state-dir", state_dir,
        ]  # fmt: skip
        if args.ledger:
            cmd += ["--ledger", args.ledger]
        if args.handle_key_file:
            cmd += ["--handle-key-file", args.handle_key_file]
        for flag in ("tls_cert", "tls_key", "tls_client_ca"):
            if getattr(args, flag):
                cmd += ["--" + flag.replace("_", "-"), getattr(args, flag)]
        if args.insecure_plaintext:
            cmd.append("--insecure-plaintext")
        cmd += ["--drain-timeout", str(args.drain_timeout)]
        commands.append(cmd)
    return supervise(commands)


def _check_config(args: argparse.Namespace) -> int:
    from authz.policy.loader import load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok ({len(policy.budgets)} budgets, {len(policy.models.rules)} model rules, "
        f"timezone {policy.timezone.key})"
    )
    if args.ledger:
        from authz.errors import AuthzError
        from authz.manage.effective import effective_lines

        try:
            lines = effective_lines(policy, args.ledger, args.state_dir)
        except (AuthzError, ValueError) as exc:
            print(f"error: allocations from {args.ledger}: {exc}", file=sys.stderr)
            return 1
        print("effective policy (allocations applied):")
        for line in lines:
            print(f"  {line}")
    if args.envoy:
        from pathlib import Path

        from authz.policy.envoy_check import envoy_warnings

        for warning in envoy_warnings(policy, Path(args.envoy)):
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="authz", description="Token-budget authorization for AI gateways"
    )
    p.add_argument("--version", action="version", version=f"authz {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve", help="run the ext_authz + ext_proc gRPC service", epilog=ENV_EPILOG
    )
    s.add_argument("--config", required=True, help="policy YAML file")
    s.add_argument(
        "--grpc-address",
        default=os.environ.get("AUTHZ_GRPC_ADDRESS", "127.0.0.1:9191"),
        help="ext_authz + ext_proc gRPC (AUTHZ_GRPC_ADDRESS; default 127.0.0.1:9191). A"
        " non-loopback address needs mTLS (--tls-*) or --insecure-plaintext",
    )
    s.add_argument(
        "--http-address",
        default=os.environ.get("AUTHZ_HTTP_ADDRESS", "127.0.0.1:9192"),
        help="admin HTTP: /healthz, /readyz, /metrics, no credential (AUTHZ_HTTP_ADDRESS;"
        " default 127.0.0.1:9192). Never expose it beyond the cluster network",
    )
    s.add_argument(
        "--check-http-address",
        default=os.environ.get("AUTHZ_CHECK_HTTP_ADDRESS", "127.0.0.1:9193"),
        help="the HTTP check API for Kong and Envoy's http_service mode: /check/<path>,"
        " POST /settle (AUTHZ_CHECK_HTTP_ADDRESS; default 127.0.0.1:9193; empty: off)."
        " The gRPC port's rules: off loopback it needs mTLS (--tls-*) or"
        " --insecure-plaintext. With --workers N the workers share it (docs/http-api.md)",
    )
    s.add_argument(
        "--manage-address",
        default="127.0.0.1:9194",
        help="the quota management API: /v1/nodes, /v1/budgets, /v1/allocations, OpenAPI at"
        " /v1/openapi.json (default 127.0.0.1:9194; empty: off). Off loopback it needs"
        " --tls-cert/--tls-key or --insecure-plaintext (docs/management-api.md)",
    )
    s.add_argument(
        "--tls-cert",
        default=os.environ.get("AUTHZ_TLS_CERT"),
        help="mTLS on the gRPC port: the server certificate chain, PEM (AUTHZ_TLS_CERT)."
        " The three --tls-* files are re-read when they change, without a restart",
    )
    s.add_argument(
        "--tls-key",
        default=os.environ.get("AUTHZ_TLS_KEY"),
        help="the server's private key, unencrypted PEM (AUTHZ_TLS_KEY)",
    )
    s.add_argument(
        "--tls-client-ca",
        default=os.environ.get("AUTHZ_TLS_CLIENT_CA"),
        help="CA bundle, PEM, that client certificates must chain to; a client certificate"
        " is required (AUTHZ_TLS_CLIENT_CA). Use a CA that signs only your gateways",
    )
    s.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=_env_flag("AUTHZ_INSECURE_PLAINTEXT"),
        help="allow plaintext gRPC on a non-loopback address: anyone who reaches it can"
        " decide and settle budgets (AUTHZ_INSECURE_PLAINTEXT=1). Logged as a warning",
    )
    s.add_argument(
        "--ledger",
        default=os.environ.get("AUTHZ_LEDGER_URL"),
        help="ledger URL (overrides the policy's ledger.url)",
    )
    s.add_argument(
        "--state-dir",
        default=os.environ.get("AUTHZ_STATE_DIR", "."),
        help="where relative state paths (the sqlite ledger, the usage journal) live;"
        " default: the working dir."
        " With --workers N, worker i uses DIR/worker-i",
    )
    s.add_argument(
        "--handle-key-file",
        default=os.environ.get("AUTHZ_HANDLE_KEY_FILE"),
        help="a secret of at least 32 bytes that signs reservation handles, the same on every"
        " replica (e.g. a Kubernetes Secret). Default: shared through Redis for a redis://"
        " ledger, kept beside the file for a sqlite:// ledger, else random per process"
        " (docs/security.md)",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds to let Checks and ext_proc streams in flight end before"
        " they are cut; a cut stream is settled by the abort rule (default 10). Keep the"
        " orchestrator's grace period above it",
    )
    s.add_argument(
        "--log-level",
        default=os.environ.get("AUTHZ_LOG_LEVEL", "info"),
        help="debug, info, warning or error (default info)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serving processes sharing the gRPC port (SO_REUSEPORT); worker i serves admin"
        " HTTP on the --http-address port + i. Needs a shared ledger (redis://)",
    )
    s.add_argument(
        "--split-memory-ledger",
        action="store_true",
        help="allow --workers > 1 with memory://: each worker then enforces its own copy of"
        " every budget (N times the allowance). For benchmarks and tests only",
    )
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    apply_env(s)  # after the last flag: each gets its AUTHZ_* variable
    s.set_defaults(fn=_serve)
    c = sub.add_parser("check-config", help="validate a policy file offline")
    c.add_argument("file")
    c.add_argument("--envoy", help="an Envoy bootstrap to cross-check (e.g. envoy/envoy.yaml)")
    c.add_argument("--ledger", help="also show the runtime allocations kept beside this ledger"
                   " (memory:// has none outside the service)")
    c.add_argument("--state-dir", default=".", help="where a relative sqlite:/// path lives")
    c.set_defaults(fn=_check_config)
    h = sub.add_parser("hash-key", help="print the sha256 of an API key for the policy")
    h.add_argument("key", help="the key, or - to read it from stdin")
    h.set_defaults(fn=_hash_key)
    from authz.manage.cli import add_manage_commands

    add_manage_commands(sub)
    from authz.audit.cli import add_audit_commands

    add_audit_commands(sub)
    from authz.envoyconf.command import add_envoy_config_command

    add_envoy_config_command(sub)
    args = p.parse_args(argv)
    if argv is None and args.command == "serve":  # a real command line, not a test's call
        from authz.allocator import reexec_with_malloc

        reexec_with_malloc()  # once, before the service allocates anything (allocator.py)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # envoy-config echoes it
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
