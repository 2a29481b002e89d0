"""``authz budgets``, ``authz allocate``, ``authz requests``: the management API from a
shell.

They speak HTTP to a running service's management API (``--api``, AUTHZ_MANAGE_URL,
default http://127.0.0.1:9194) with a bearer token or an admin key (``--token``,
AUTHZ_MANAGE_TOKEN; ``-`` reads it from stdin), so an operator has exactly the
permissions the API gives that credential. ``authz check-config --ledger URL`` shows
the effective policy offline (authz/manage/effective.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from typing import Any

import httpx

__all__ = ["add_manage_commands", "parse_when"]

_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float) -> float:
    """``+90m``, ``+2h``, ``+1d``; an ISO 8601 time (with its offset); or epoch seconds."""
    found = _RELATIVE.match(text.strip())
    if found:
        return now + float(found.group(1)) * _UNIT_S[found.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (+2h, 2026-12-24T18:00:00+01:00 or epoch"
                         " seconds)") from None  # fmt: skip
    if moment.tzinfo is None:
        raise ValueError(f"give the time's UTC offset: {text!r}")
    return moment.timestamp()


def _client(args: argparse.Namespace) -> httpx.Client:
    token = args.token
    if token == "-":
        token = sys.stdin.readline().strip()
    if not token:
        raise SystemExit("authz: no credential: --token or AUTHZ_MANAGE_TOKEN (a JWT or an"
                         " admin key)")  # fmt: skip
    return httpx.Client(base_url=args.api, timeout=args.timeout, trust_env=False,
                        headers={"authorization": f"Bearer {token}"})  # fmt: skip


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    try:
        with _client(args) as client:
            resp = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        print(f"authz: cannot reach the management API at {args.api}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        if isinstance(detail, list):
            detail = "; ".join(str(d.get("msg", d)) for d in detail)
        print(f"authz: {resp.status_code}: {detail}", file=sys.stderr)
        raise SystemExit(1)
    return resp.json() if resp.content else None


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _budgets(args: argparse.Namespace) -> int:
    out = _call(args, "GET", "/v1/budgets", params={"node": args.node})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if out["frozen"]:
        print(f"FROZEN: {out['frozen']['reason']} (allocation {out['frozen']['id']})")
    print(f"{'counter':<20} {'period':<7} {'yaml':>10} {'limit':>10} {'used':>10}"
          f" {'reserved':>9} {'remaining':>10}  resets")  # fmt: skip
    for c in out["counters"]:
        print(f"{c['name']:<20} {c['period'] or '-':<7} {c['yaml_limit']:>10} {c['limit']:>10}"
              f" {c['used']:>10} {c['reserved']:>9} {c['remaining']:>10}  {_when(c['reset_at'])}")
    return 0


def _allocate(args: argparse.Namespace) -> int:
    if args.list:
        params = {"node": args.node} if args.node else {}
        out = _call(args, "GET", "/v1/allocations", params=params)
        for a in out["allocations"] if not args.json else []:
            amount = "" if a["kind"] == "freeze" else f" {a['budget']} {a['tokens']:+d}"
            print(f"{a['id']}  {a['kind']:<9} {a['node']}{amount}  until {_when(a['expires_at'])}"
                  f"  by {a['created_by']}: {a['reason']}")
        if args.json:
            print(json.dumps(out, indent=2))
        return 0
    if args.withdraw:
        _call(args, "DELETE", f"/v1/allocations/{args.withdraw}")
        print(f"withdrawn {args.withdraw}")
        return 0
    if not args.node or not args.reason:
        print("authz: allocate needs --node and --reason (or --list, --withdraw ID)",
              file=sys.stderr)  # fmt: skip
        return 2
    body: dict[str, Any] = {"kind": args.kind, "node": args.node, "reason": args.reason}
    if args.budget is not None:
        body["budget"] = args.budget
    if args.tokens is not None:
        body["tokens"] = args.tokens
    try:
        now = time.time()
        if args.expires:
            body["expires_at"] = parse_when(args.expires, now)
        if args.starts:
            body["starts_at"] = parse_when(args.starts, now)
    except ValueError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 2
    out = _call(args, "POST", "/v1/allocations", json=body)
    print(json.dumps(out, indent=2) if args.json else f"allocated {out['id']}")
    return 0


def _requests(args: argparse.Namespace) -> int:
    if args.action == "list":
        out = _call(args, "GET", "/v1/requests")
        if args.json:
            print(json.dumps(out, indent=2))
        for r in [] if args.json else out["requests"]:
            where = f"waiting at {r['waiting_at']}" if r["status"] == "pending" else (
                f"by {r['decided_by']}")  # fmt: skip
            print(f"{r['id']}  {r['status']:<8} {r['node']} {r['budget']} +{r['tokens']}"
                  f"  {where}  asked by {r['requested_by']}: {r['reason']}")
        return 0
    if args.action == "ask":
        if not (args.node and args.budget and args.tokens and args.reason):
            print("authz: requests ask needs --node, --budget, --tokens and --reason",
                  file=sys.stderr)  # fmt: skip
            return 2
        body: dict[str, Any] = {"node": args.node, "budget": args.budget,
                                "tokens": args.tokens, "reason": args.reason}  # fmt: skip
        if args.expires:
            try:
                body["expires_at"] = parse_when(args.expires, time.time())
            except ValueError as exc:
                print(f"authz: {exc}", file=sys.stderr)
                return 2
        out = _call(args, "POST", "/v1/requests", json=body)
        print(json.dumps(out, indent=2) if args.json else
              f"requested {out['id']} (waiting at {out['waiting_at']})")  # fmt: skip
        return 0
    if not args.id:
        print(f"authz: requests {args.action} needs the request's id", file=sys.stderr)
        return 2
    out = _call(args, "POST", f"/v1/requests/{args.id}/{args.action}",
                json={"note": args.note or ""})  # fmt: skip
    print(json.dumps(out, indent=2) if args.json else f"{out['status']} {out['id']}"
          + (f": allocation {out['allocation_id']}" if out["allocation_id"] else ""))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=os.environ.get("AUTHZ_MANAGE_URL", "http://127.0.0.1:9194"),
                   help="the management API (AUTHZ_MANAGE_URL; default http://127.0.0.1:9194)")
    p.add_argument("--token", default=os.environ.get("AUTHZ_MANAGE_TOKEN"),
                   help="a JWT or an admin key; - reads it from stdin (AUTHZ_MANAGE_TOKEN)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")


def add_manage_commands(sub: Any) -> None:
    b = sub.add_parser("budgets", help="a node's budgets and rates, as the management API"
                       " shows them")  # fmt: skip
    b.add_argument("--node", required=True, help="e.g. org:acme/department:research")
    _common(b)
    b.set_defaults(fn=_budgets)
    a = sub.add_parser("allocate", help="raise, lower or freeze a node through the"
                       " management API; --list, --withdraw ID")  # fmt: skip
    a.add_argument("--node", help="e.g. org:acme/department:research")
    a.add_argument("--kind", choices=("adjust", "emergency", "freeze"), default="adjust")
    a.add_argument("--budget", help="the budget's name (adjust, emergency)")
    a.add_argument("--tokens", type=int, help="units to add; negative to take away")
    a.add_argument("--expires", help="+2h, an ISO 8601 time or epoch seconds")
    a.add_argument("--starts", help="as --expires; default now")
    a.add_argument("--reason", help="why (kept with the allocation)")
    a.add_argument("--list", action="store_true", help="list the allocations you may see")
    a.add_argument("--withdraw", metavar="ID", help="withdraw an allocation")
    _common(a)
    a.set_defaults(fn=_allocate)
    r = sub.add_parser("requests", help="ask for more quota, list, approve or reject requests"
                       " through the management API")  # fmt: skip
    r.add_argument("action", choices=("list", "ask", "approve", "reject"))
    r.add_argument("id", nargs="?", help="the request (approve, reject)")
    r.add_argument("--node", help="ask: a node on your own path")
    r.add_argument("--budget", help="ask: the budget's name")
    r.add_argument("--tokens", type=int, help="ask: units more")
    r.add_argument("--expires", help="ask: +2h, an ISO 8601 time or epoch seconds")
    r.add_argument("--reason", help="ask: why")
    r.add_argument("--note", help="approve, reject: a note kept in the audit trail")
    _common(r)
    r.set_defaults(fn=_requests)
