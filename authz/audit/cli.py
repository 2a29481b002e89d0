"""``authz audit verify`` and ``authz audit export``.

Where the chain is read from, first given wins: ``--file PATH`` (a JSON-lines chain),
``--ledger URL`` (``redis://...``: the stream beside that ledger), or ``--config POLICY``
(the policy's ledger URL and ``audit.file``; ``AUTHZ_LEDGER_URL`` overrides the URL,
as for ``authz serve``).

    verify   prints "ok: N entries, head <hash>" and exits 0, or names the first broken
             entry ("broken: entry seq=17 at line 17: its content does not match its
             hash (edited)") and exits 1. Exit 2: the chain could not be read.
    export   writes every entry as one JSON object per line (to --out or stdout), in
             order, exactly as stored; verify the export later with --file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, BinaryIO

from authz.audit import AuditLog, Broken, open_audit_log, verify_log
from authz.errors import AuthzError

__all__ = ["add_audit_commands"]


def _open(args: argparse.Namespace) -> AuditLog:
    if args.file:
        from authz.audit.file import FileAuditLog

        return FileAuditLog(args.file)
    if args.ledger:
        return open_audit_log(args.ledger, None)
    if args.config:
        from authz.policy.loader import load_policy

        policy = load_policy(args.config)
        url = os.environ.get("AUTHZ_LEDGER_URL") or policy.ledger_url
        return open_audit_log(url, policy.audit.file)
    raise ValueError("say where the chain is: --file PATH, --ledger URL or --config POLICY")


async def _verify(args: argparse.Namespace) -> int:
    log = _open(args)
    try:
        result = await verify_log(log)
    finally:
        await log.close()
    if isinstance(result, Broken):
        print(f"broken: {result}")
        return 1
    print(f"ok: {result.count} entries, head {result.head}")
    return 0


async def _export(args: argparse.Namespace, out: BinaryIO) -> int:
    log = _open(args)
    n = 0
    try:
        async for _, raw in log.stored():
            out.write(raw.rstrip(b"\n") + b"\n")
            n += 1
    finally:
        await log.close()
    out.flush()
    print(f"exported {n} entries", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        if args.audit_command == "verify":
            return asyncio.run(_verify(args))
        if args.out:
            with open(args.out, "wb") as out:
                return asyncio.run(_export(args, out))
        return asyncio.run(_export(args, sys.stdout.buffer))
    except (AuthzError, ValueError, OSError) as exc:
        print(f"authz audit: {exc}", file=sys.stderr)
        return 2


def add_audit_commands(sub: Any) -> None:
    a = sub.add_parser("audit", help="verify or export the hash-chained audit trail")
    commands = a.add_subparsers(dest="audit_command", required=True)
    for name, text in (
        ("verify", "check every link of the chain; name the first broken entry"),
        ("export", "write the chain as JSON lines"),
    ):
        c = commands.add_parser(name, help=text)
        c.add_argument("--file", help="a JSON-lines audit file (the memory:// ledger's chain)")
        c.add_argument("--ledger", help="a ledger URL (redis://...): its audit stream")
        c.add_argument("--config", help="a policy file: its ledger URL and audit.file")
        if name == "export":
            c.add_argument("--out", help="write here instead of stdout")
        c.set_defaults(fn=_run)
