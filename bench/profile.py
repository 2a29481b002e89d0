"""``python -m bench profile``: py-spy on the authz service under load in configuration (c).

Writes a speedscope profile (open at speedscope.app), a flame graph (SVG) and the
collapsed stacks under bench/results/ (one load window each), and prints the top
functions by self time and by total time, as ``file:function``. py-spy is installed
into the project venv on first use.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.configs import main_configs
from bench.scenario import write_policy, write_requests
from bench.stack import running
from bench.wrk import BenchError, run_wrk

__all__ = ["profile", "top_functions"]


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        print("  installing py-spy into the venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    if not Path(found).exists():
        raise BenchError("py-spy could not be installed")
    return found


def _frame(raw: str) -> str:
    """'Check (authz/envoy/authz.py:31)' -> 'authz/envoy/authz.py:Check'."""
    name, _, where = raw.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{name}"


def top_functions(collapsed: Path, n: int = 25) -> tuple[list[tuple[str, float]], ...]:
    """(self %, total %) per function from py-spy's collapsed stacks (``--format raw``)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        samples += k
        frames = [_frame(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    pct = 100.0 / max(1, samples)
    return (
        [(f, c * pct) for f, c in own.most_common(n)],
        [(f, c * pct) for f, c in total.most_common(n)],
    )


def profile(args: argparse.Namespace) -> int:
    spy = _py_spy()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.out.resolve() / f"profile-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    policy = write_policy(workdir)
    requests = write_requests(workdir / "requests.txt", args.users)
    cfg = next(c for c in main_configs() if c.key == "c")
    with running(cfg, workdir / "c", policy) as run:
        pid = run.service_pids[0]
        run_wrk(run.url, requests, duration_s=args.warmup, connections=args.connections)
        outputs = {}
        formats = (
            ("speedscope", "speedscope.json"), ("flamegraph", "svg"), ("raw", "collapsed.txt"),
        )  # fmt: skip
        for fmt, ext in formats:
            out = workdir / f"authz-c.{ext}"
            spy_cmd = [spy, "record", "-p", str(pid), "-d", str(int(args.duration)), "-r", "250",
                       "-f", fmt, "-o", str(out), "--nonblocking"]  # fmt: skip
            spy_proc = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            result = run_wrk(run.url, requests, duration_s=args.duration,
                             connections=args.connections)  # fmt: skip
            _, err = spy_proc.communicate(timeout=60)
            if spy_proc.returncode != 0:
                raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-1000:]}")
            outputs[fmt] = out
            print(f"  profiled {result.rps:,.0f} req/s for {args.duration:g} s -> {out}")
    own, total = top_functions(outputs["raw"])
    print("\nTop functions by self time (% of samples in the authz process):")
    for name, p in own:
        print(f"  {p:5.1f}%  {name}")
    print("\nTop functions by total time (including callees):")
    for name, p in total:
        print(f"  {p:5.1f}%  {name}")
    return 0
