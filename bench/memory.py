"""``python -m bench memory``: RSS of the authz service after 100k and after N checks.

Configuration (e), so every reservation is settled as in production (in (c) nothing is
settled and every reservation is held until its TTL by design). wrk runs in 20 s slices
until Envoy has counted N allowed checks; the service's RSS (VmRSS) is read between
slices. Growth between 100k and N is what a long-running service would keep gaining.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.configs import main_configs
from bench.report import environment, write_json
from bench.scenario import write_policy, write_requests
from bench.stack import Running, running
from bench.wrk import run_wrk

__all__ = ["memory", "rss_mb"]


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
