"""``authz serve``, ``authz check-config``, ``authz hash-key``."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from authz.errors import PolicyError

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from authz.server import ServeOptions, serve
    from authz.telemetry.logging import setup_logging

    setup_logging(args.log_level)
    opts = ServeOptions(
        config=args.config,
        grpc_address=args.grpc_address,
        http_address=args.http_address,
        ledger_url=args.ledger,
    )
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    try:
        runner(serve(opts))
    except PolicyError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    return 0


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
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="authz", description="Token-budget authorization for AI gateways"
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the ext_authz + ext_proc gRPC service")
    s.add_argument("--config", required=True, help="policy YAML file")
    s.add_argument("--grpc-address", default=os.environ.get("AUTHZ_GRPC_ADDRESS", "0.0.0.0:9191"))
    s.add_argument("--http-address", default=os.environ.get("AUTHZ_HTTP_ADDRESS", "0.0.0.0:9192"))
    s.add_argument(
        "--ledger",
        default=os.environ.get("AUTHZ_LEDGER_URL"),
        help="ledger URL (overrides the policy's ledger.url)",
    )
    s.add_argument("--log-level", default=os.environ.get("AUTHZ_LOG_LEVEL", "info"))
    s.set_defaults(fn=_serve)
    c = sub.add_parser("check-config", help="validate a policy file offline")
    c.add_argument("file")
    c.set_defaults(fn=_check_config)
    h = sub.add_parser("hash-key", help="print the sha256 of an API key for the policy")
    h.add_argument("key", help="the key, or - to read it from stdin")
    h.set_defaults(fn=_hash_key)
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
