"""``python -m bench memory``: RSS of the authz service after 100k and after N checks.

Configuration (e), so every reservation is settled as in production (in (c) nothing is
settled and every reservation is held until its TTL by design). wrk runs in 20 s slices
until Envoy has counted N allowed checks; the service's RSS (VmRSS) is read between
slices. Growth between 100k and N is what a long-running service would keep gaining.

``python -m bench memory --idle``: memory follows activity, not history (issue 9, #7).
After a warm-up of 1,000 users (``--warm-checks``, 60k: the steady state of what follows
the request rate rather than the callers), RSS "before"; then N distinct users (200k by default,
ES256 JWTs, so minting them takes seconds, not minutes) send one request each through
Envoy (configuration e: ext_proc settles each), RSS at the peak (read between wrk runs:
one per file of 25k users, each sent once); then nothing, and RSS
"after" once their minute windows have ended and the sweep has forgotten them (two
rotations of the enforcer's memos, ``--idle-wait`` seconds). The policy is the bench's
examples/policy.yaml without the per-user *daily* budget: a counter in a live window is
kept by design, so a daily user budget holds each user's counter until midnight. Per
user there remain the minute rate (user-rpm) and every org/department/team budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.configs import main_configs
from bench.report import environment, write_json
from bench.scenario import AUDIENCE, ISSUER, REQUEST_BODY, write_policy, write_requests
from bench.stack import Running, running
from bench.wrk import run_wrk
from tests.support.tokens import jwks_document, make_ec_key, make_rsa_key, mint

__all__ = ["idle", "memory", "rss_mb"]

LOAD_CHUNK = 25_000  # users per wrk run in ``--idle``


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _checks(run: Running) -> int:
    return int(run.envoy.stats("http.llm.ext_authz.").get("http.llm.ext_authz.ok", 0))


def memory(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.out.resolve() / f"memory-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    policy = write_policy(workdir)
    requests = write_requests(workdir / "requests.txt", args.users)
    cfg = next(c for c in main_configs() if c.key == "e")
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    with running(cfg, workdir / "e", policy) as run:
        pid = run.service_pids[0]
        samples.append({"checks": _checks(run), "rss_mb": rss_mb(pid), "s": 0.0})
        marks = [100_000, *range(200_000, args.checks + 1, 100_000), args.checks]
        while samples[-1]["checks"] < args.checks:
            run_wrk(run.url, requests, duration_s=20, connections=args.connections)
            time.sleep(1.0)  # let settlements in flight land
            sample = {
                "checks": _checks(run),
                "rss_mb": round(rss_mb(pid), 1),
                "s": round(time.monotonic() - start, 1),
            }
            samples.append(sample)
            if marks and sample["checks"] >= marks[0]:
                while marks and sample["checks"] >= marks[0]:
                    marks.pop(0)
                print(f"  {sample['checks']:>9,} checks  RSS {sample['rss_mb']:7.1f} MB"
                      f"  ({sample['s']:.0f} s)", flush=True)  # fmt: skip
    at_100k = next(s for s in samples if s["checks"] >= 100_000)
    end = samples[-1]
    growth = end["rss_mb"] - at_100k["rss_mb"]
    per_check = growth * 1024 * 1024 / max(1, end["checks"] - at_100k["checks"])
    print(f"\nRSS after {at_100k['checks']:,} checks: {at_100k['rss_mb']:.1f} MB;"
          f" after {end['checks']:,}: {end['rss_mb']:.1f} MB"
          f" ({growth:+.1f} MB, {per_check:.0f} bytes per check)")  # fmt: skip
    doc = {"environment": environment(), "users": args.users, "samples": samples,
           "rss_100k_mb": at_100k["rss_mb"], "rss_end_mb": end["rss_mb"],
           "bytes_per_check": round(per_check, 1)}  # fmt: skip
    write_json(args.out / f"memory-{stamp}.json", doc)
    return 0


def _idle_policy(workdir: Path) -> Path:
    """The bench policy without per-user daily budgets, trusting an ES256 key too."""
    import yaml

    path = write_policy(workdir)
    policy = yaml.safe_load(path.read_text())
    policy["budgets"] = [b for b in policy["budgets"] if "user" not in b["match"]]
    policy["identity"]["jwt"]["algorithms"] = ["RS256", "ES256"]
    keys = jwks_document(make_rsa_key("bench"), make_ec_key("bench-ec"))
    (workdir / "jwks.json").write_text(json.dumps(keys))
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def _idle_requests(path: Path, first: int, count: int) -> Path:
    """One POST per user ``first`` .. ``first + count - 1``, each with its own ES256 JWT."""
    key, now = make_ec_key("bench-ec"), int(time.time())
    body = json.dumps(REQUEST_BODY, separators=(",", ":"))
    with path.open("w") as out:
        for i in range(first, first + count):
            claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"idle-{i:07d}", "org_id": "acme",
                      "department": ("research", "finance", "sales", "support")[i % 4],
                      "groups": [f"team-t{i % 8}"], "iat": now, "exp": now + 6 * 3600}  # fmt: skip
            out.write(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {mint(key, claims)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                f"{body}\0\n"
            )
    return path


def _drive(run: Running, requests: Path, until: int, connections: int) -> None:
    """wrk slices until Envoy has counted ``until`` allowed checks in all."""
    while _checks(run) < until:
        run_wrk(run.url, requests, duration_s=10, connections=connections)


def idle(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.out.resolve() / f"memory-idle-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    policy = _idle_policy(workdir)
    users = args.idle_users
    print(f"minting {users:,} ES256 tokens ...", flush=True)
    warm = _idle_requests(workdir / "warm.txt", 10_000_000, 1000)
    # In files of LOAD_CHUNK users, each sent once by its own wrk run (wrk.lua "once"):
    # wrk loads a whole file before it starts, and one of 200k requests (136 MB) took it
    # over 14 minutes at a load average of 14.
    chunks = [
        _idle_requests(workdir / f"load-{first:07d}.txt", first, min(LOAD_CHUNK, users - first))
        for first in range(0, users, LOAD_CHUNK)
    ]
    key = "e" if args.ledger == "memory" else f"e/{args.ledger}"
    cfg = next(c for c in main_configs() if c.key == key)
    with running(cfg, workdir / "e", policy) as run:
        pid = run.service_pids[0]
        # Steady state first: the structures that follow the request rate (settled ids of
        # the last minute, heaps, free lists, gRPC buffers) fill in the first ~50k checks.
        _drive(run, warm, args.warm_checks, args.connections)
        time.sleep(2.0)
        before = rss_mb(pid)
        base = _checks(run)
        print(f"  before: {before:7.1f} MB after {base:,} warm-up checks", flush=True)
        peak, start = before, time.monotonic()
        for load in chunks:
            # Every user of the file once, and wrk stops when all are answered: no user
            # sent twice, no request cut between its Check and its response (that
            # would leave its reservation open for the 600 s TTL, past the idle).
            run_wrk(run.url, load, duration_s=3600, connections=args.connections, once=True)
            peak = max(peak, rss_mb(pid))
        loaded = _checks(run) - base
        print(f"  peak:   {peak:7.1f} MB after {loaded:,} checks of {users:,} users"
              f" ({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip
        samples = []
        idle_start = time.monotonic()
        while (waited := time.monotonic() - idle_start) < args.idle_wait:
            time.sleep(10.0)
            samples.append({"s": round(waited + 10, 1), "rss_mb": round(rss_mb(pid), 1)})
        after = rss_mb(pid)
    growth = (after - before) / before * 100
    print(f"  after:  {after:7.1f} MB, {args.idle_wait:.0f} s idle"
          f" ({growth:+.1f}% against before; the target is within 10%)")  # fmt: skip
    doc = {"environment": environment(), "users": users, "ledger": args.ledger,
           "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak, 1),
           "rss_after_mb": round(after, 1), "checks": loaded, "idle_s": args.idle_wait,
           "idle_samples": samples}  # fmt: skip
    write_json(args.out / f"memory-idle-{stamp}.json", doc)
    return 0 if growth <= 10 else 1
