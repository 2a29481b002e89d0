"""The default mode: saturation (a)-(f), fixed rate, 1 vs 2 workers, the peer."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import peer
from bench.configs import fixed_rate, main_configs, worker_configs
from bench.report import environment, table, write_json
from bench.scenario import write_policy, write_requests
from bench.stack import Config, Running, redis_unavailable, running
from bench.wrk import BenchError, WrkResult, run_wrk
from tests.support.procs import HarnessError

__all__ = ["Options", "bench_run", "measure"]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Options:
    duration_s: float = 10.0
    warmup_s: float = 3.0
    connections: int = 32
    users: int = 1000
    only: tuple[str, ...] = ()  # config keys; empty: all
    workers: bool = True
    rate: bool = True
    peer: bool = True
    out: Path = Path("bench/results")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(run: Running, requests: Path, opts: Options, rate: float | None = None) -> WrkResult:
    if opts.warmup_s > 0:
        run_wrk(run.url, requests, duration_s=opts.warmup_s, connections=opts.connections,
                rate=rate)  # fmt: skip
    return run_wrk(
        run.url, requests, duration_s=opts.duration_s, connections=opts.connections, rate=rate
    )


def measure_cpu(run: Running, requests: Path, opts: Options) -> tuple[WrkResult, dict[str, float]]:
    """A measured run plus the CPU each side spent per request (microseconds)."""
    if opts.warmup_s > 0:
        run_wrk(run.url, requests, duration_s=opts.warmup_s, connections=opts.connections)
    pids = {"envoy": [run.envoy_pid], "service": run.service_pids}
    before = {k: sum(_cpu_s(p) for p in v) for k, v in pids.items()}
    result = run_wrk(run.url, requests, duration_s=opts.duration_s, connections=opts.connections)
    after = {k: sum(_cpu_s(p) for p in v) for k, v in pids.items()}
    per = max(1, result.requests)
    cpu = {f"{k}_cpu_us_per_req": round((after[k] - before[k]) * 1e6 / per, 1) for k in pids}
    cpu["service_cores"] = round((after["service"] - before["service"]) / result.seconds, 2)
    return result, cpu


def _row(cfg: Config, result: WrkResult, **extra: Any) -> dict[str, Any]:
    return {"key": cfg.key, "title": cfg.title, **result.as_dict(), **extra}


def _authz_stats(run: Running) -> dict[str, float]:
    """Envoy's counters for the authz cluster: how many connections it opened."""
    stats = run.envoy.stats("cluster.authz.")
    return {
        "authz_connections": stats.get("cluster.authz.upstream_cx_total", 0),
        "ext_authz_ok": run.envoy.stats("http.llm.ext_authz.").get("http.llm.ext_authz.ok", 0),
    }


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return float(values[min(len(values) - 1, int(q * len(values)))])


def _authz_us(run: Running, skip: int) -> dict[str, float]:
    """p50/p99 of Envoy's own ext_authz latency (access log authz_us) after ``skip`` lines."""
    time.sleep(0.3)  # the access log is flushed every 50 ms
    lines = run.envoy.access_log()[skip:]
    us = [int(x["authz_us"]) for x in lines if str(x.get("authz_us", "")).isdigit()]
    return {
        "authz_samples": len(us),
        "authz_p50_ms": _percentile(us, 0.50) / 1000,
        "authz_p99_ms": _percentile(us, 0.99) / 1000,
        "authz_mean_ms": round(statistics.fmean(us) / 1000, 3) if us else float("nan"),
    }


def _wanted(cfg: Config, opts: Options) -> bool:
    return not opts.only or cfg.key in opts.only or cfg.key.split("/")[0].split("@")[0] in opts.only


def bench_run(opts: Options) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = opts.out.resolve() / f"run-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    policy = write_policy(workdir)
    requests = write_requests(workdir / "requests.txt", opts.users)
    env = environment()
    print(
        f"bench: {env['cores']} cores ({env['cpu']}), Envoy {env['envoy']}, {env['wrk']};"
        f" wrk 1 thread x {opts.connections} connections, {opts.duration_s:g} s per run"
        f" after {opts.warmup_s:g} s warm-up; {opts.users} distinct users (JWT RS256)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    redis_reason = redis_unavailable()
    for cfg in main_configs():
        if not _wanted(cfg, opts):
            continue
        if cfg.ledger == "redis" and redis_reason:
            print(f"  {cfg.key}: skipped: redis ledger not available ({redis_reason})", flush=True)
            rows.append({"key": cfg.key, "title": cfg.title,
                         "skipped": "redis ledger not available"})  # fmt: skip
            continue
        try:
            with running(cfg, workdir / cfg.key, policy) as run:
                result, cpu = measure_cpu(run, requests, opts)
                rows.append(_row(cfg, result, **cpu))
        except (BenchError, HarnessError, TimeoutError) as exc:
            # One broken configuration should not cost the others' figures.
            print(f"  {cfg.key}: FAILED: {exc}", flush=True)
            rows.append({"key": cfg.key, "title": cfg.title, "skipped": f"failed: {exc}"[:200]})
            continue
        print(f"  {cfg.key}: {result.rps:,.0f} req/s p50 {result.p50_ms:.2f} ms"
              f" p99 {result.p99_ms:.2f} ms failed {result.failed}; CPU per request: Envoy"
              f" {cpu['envoy_cpu_us_per_req']:.0f} us, service {cpu['service_cpu_us_per_req']:.0f}"
              f" us ({cpu['service_cores']:.2f} cores)", flush=True)  # fmt: skip

    by_key = {r["key"]: r for r in rows if not r.get("skipped")}
    a_rps = by_key.get("a", {}).get("rps")
    b_rps = by_key.get("b", {}).get("rps")

    worker_rows: list[dict[str, Any]] = []
    if opts.workers:
        for cfg in worker_configs():
            if not _wanted(cfg, opts):
                continue
            with running(cfg, workdir / cfg.key.replace("/", "-"), policy) as run:
                result, cpu = measure_cpu(run, requests, opts)
                worker_rows.append(_row(cfg, result, **cpu, **_authz_stats(run)))
            print(f"  {cfg.key}: {result.rps:,.0f} req/s p99 {result.p99_ms:.2f} ms",
                  flush=True)  # fmt: skip

    rate_rows: list[dict[str, Any]] = []
    if opts.rate and b_rps:
        # Half of b's saturation rate (the yardstick); and, when c saturates below
        # that, half of c's too: latency compared where neither side is queueing.
        rates = [round(b_rps / 2)]
        c_rps = by_key.get("c", {}).get("rps")
        if c_rps and c_rps < b_rps / 2:
            rates.append(round(c_rps / 2))
        for rate in rates:
            for cfg in fixed_rate():
                if _wanted(cfg, opts):
                    rate_rows.append(_paced(cfg, rate, workdir, policy, requests, opts))

    peer_rows: list[dict[str, Any]] = []
    if opts.peer and (not opts.only or "peer" in opts.only):
        peer_rows = peer.compare(workdir / "peer", policy, requests, opts)

    print()
    print(table(rows + worker_rows, a_rps=a_rps, b_rps=b_rps))
    if rate_rows:
        print()
        print(_rate_table(rate_rows))
    if peer_rows:
        print()
        print(table(peer_rows, a_rps=None, b_rps=None))
    print()
    _targets(by_key, rate_rows)
    doc = {
        "environment": env,
        "options": {k: str(v) for k, v in opts.__dict__.items()},
        "saturation": rows,
        "workers": worker_rows,
        "fixed_rate": rate_rows,
        "peer": peer_rows,
    }
    path = write_json(opts.out / f"bench-{stamp}.json", doc)
    write_json(opts.out / "latest.json", doc)
    print(f"results: {path}")
    return 0


def _paced(
    cfg: Config, rate: int, workdir: Path, policy: Path, requests: Path, opts: Options
) -> dict[str, Any]:
    with running(cfg, workdir / f"{cfg.key.replace('@', '-at-')}-{rate}", policy) as run:
        if opts.warmup_s > 0:
            run_wrk(run.url, requests, duration_s=opts.warmup_s,
                    connections=opts.connections, rate=rate)  # fmt: skip
        time.sleep(0.3)
        skip = len(run.envoy.access_log())
        result = run_wrk(run.url, requests, duration_s=opts.duration_s,
                         connections=opts.connections, rate=rate)  # fmt: skip
        row = _row(cfg, result, **_authz_us(run, skip))
    print(f"  {cfg.key} ({rate}/s): got {result.rps:,.0f} req/s p50 {result.p50_ms:.2f}"
          f" p99 {result.p99_ms:.2f} ms; Envoy authz_us p99 {row['authz_p99_ms']:.2f} ms",
          flush=True)  # fmt: skip
    return row


def _rate_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':<8} {'target/s':>8} {'got/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
            f" {'Envoy authz p50':>16} {'authz p99':>10}")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['key']:<8} {r['rate']:>8,.0f} {r['rps']:>8,.0f} {r['p50_ms']:>7.2f}"
            f" {r['p99_ms']:>7.2f} {r['authz_p50_ms']:>16.2f} {r['authz_p99_ms']:>10.2f}"
        )
    return "\n".join(out)


def _targets(by_key: dict[str, dict[str, Any]], rate_rows: list[dict[str, Any]]) -> None:
    b = by_key.get("b", {}).get("rps")
    checks = []
    for key, floor in (("c", 0.9), ("d", 0.85), ("e", 0.7)):
        if b and key in by_key:
            row = by_key[key]
            ratio = row["rps"] / b
            if row["failed"] > 0.01 * row["requests"]:  # fast failures are not throughput
                checks.append((f"{key} >= {floor} x b", "invalid", False))
                continue
            checks.append((f"{key} >= {floor} x b", f"{ratio:.2f}", ratio >= floor))
    for rate in sorted({r["rate"] for r in rate_rows}, reverse=True):
        at = {r["key"]: r for r in rate_rows if r["rate"] == rate}
        if "b@rate" in at and "c@rate" in at:
            diff = at["c@rate"]["p99_ms"] - at["b@rate"]["p99_ms"]
            checks.append((f"p99 c - b at {rate:.0f}/s <= 1 ms", f"{diff:+.2f} ms", diff <= 1.0))
            p99 = at["c@rate"]["authz_p99_ms"]
            checks.append((f"Envoy ext_authz p99 (c) at {rate:.0f}/s < 10 ms", f"{p99:.2f} ms",
                           p99 < 10))  # fmt: skip
    for name, value, ok in checks:
        print(f"target {name:<40} {value:>10}  {'met' if ok else 'NOT met'}")
    _sqlite_cost(by_key)


def _sqlite_cost(by_key: dict[str, dict[str, Any]]) -> None:
    """What the persistent default costs: each x/sqlite against x on memory://."""
    for key in ("c", "e"):
        mem, disk = by_key.get(key), by_key.get(f"{key}/sqlite")
        if mem and disk:
            cpu = disk["service_cpu_us_per_req"] - mem["service_cpu_us_per_req"]
            p99 = disk["p99_ms"] - mem["p99_ms"]
            print(f"cost of the sqlite default ({key}/sqlite vs {key} on memory://):"
                  f" {disk['rps'] / mem['rps']:.2f} x the req/s, p99 {p99:+.2f} ms,"
                  f" service CPU {cpu:+.0f} us/request")  # fmt: skip


def load_latest(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "latest.json").read_text()))
