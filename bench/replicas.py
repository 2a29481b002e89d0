"""``python -m bench replicas``: exact totals and zero overshoot across authz replicas.

Issue 10 finding 3: on a loaded machine two replicas behind one Envoy ended with the
ledger short of what the upstream reported, and units still held after a clean stop.
This starts the real parts (redis-server, N authz replicas on one Redis, one Envoy
with every replica as an endpoint of its ``authz`` cluster, round robin, the fake LLM
upstream), optionally K CPU-bound hogs beside them, and sends, for ``--seconds``,
requests of ``--users`` distinct users (each its own JWT): JSON and SSE answers, some
streams left by the client mid-way, per-user and per-org hard budgets that run out.

After every response has ended and every replica stopped (SIGTERM, exit code 0), it
reads every counter in Redis and compares, per budget counter:
- ``used`` with the usage the upstream reported (:mod:`bench.replicas_expect` says what
  that means for a stream the client left);
- ``reserved + leased``: must be 0 (nothing held once every response has ended);
- ``used`` with the budget: a hard budget is never exceeded (the driver sends input
  token counts equal to the service's estimate, so usage never exceeds a reservation).
It prints the figures and exits 1 if any of them is off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.replicas_expect import Totals, check_totals, held_units, prompt_tokens
from tests.support.envoy_proc import EnvoyProcess, cluster, http_filter, render_envoy_config
from tests.support.fake_llm import FakeLLM
from tests.support.jwks_server import JwksServer
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService
from tests.support.tokens import make_ec_key, make_rsa_key, mint

__all__ = ["Options", "main", "run"]

CONFIRM_S = 10.0  # the policy's reservations.confirm_s (the default)
USER_UNITS = 4000  # per user and day: the heavy users run out
CAP_ORG_UNITS = 15_000  # org "cap" (a tenth of the users) shares this: it runs out too
POLICY = """
version: 1
timezone: UTC
identity:
  jwt: {{issuer: https://idp.test/, audience: llm-gateway, algorithms: [RS256],
        jwks_url: {jwks_url}, leeway_s: 30}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: org-day, match: {{org: load}}, tokens: 100000000, period: day}}
  - {{name: cap-day, match: {{org: cap}}, tokens: {cap}, period: day}}
  - {{name: user-day, match: {{user: "*"}}, tokens: {user}, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 200}}]
  unknown: deny
ledger:
  breaker: {{journal_path: {journal}}}
"""


_ENV = {"AUTHZ_DECISION_LOG": os.environ.get("AUTHZ_DECISION_LOG", "denials")}


@dataclass(frozen=True, slots=True)
class Options:
    replicas: int = 2
    users: int = 1000
    seconds: float = 60.0
    hogs: int = 0
    lease: str = "off"
    concurrency: int = 24
    seed: int = 1
    workdir: Path | None = None
    check_timeout: str = ""  # ext_authz grpc_service.timeout, e.g. "2s" (default: envoy.yaml's)
    message_timeout: str = ""  # ext_proc message_timeout, e.g. "0.5s" (default: envoy.yaml's)


def _org(user: int, users: int) -> str:
    return "cap" if user >= users - max(1, users // 10) else "load"


async def _load(opts: Options, url: str, tokens: list[str], counts: dict[str, int]) -> None:
    rng = random.Random(opts.seed)
    heavy = max(1, opts.users // 20)  # 5% of the users send 40% of the requests
    end = time.monotonic() + opts.seconds
    limits = httpx.Limits(max_connections=opts.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def one() -> None:
            user = rng.randrange(heavy) if rng.random() < 0.4 else rng.randrange(opts.users)
            kind = rng.choices(("json", "sse", "leave"), (3, 6, 1))[0]
            words = rng.randrange(1, 60)
            body = {
                "model": "gpt-4o",
                "max_tokens": 60,
                "stream": kind != "json",
                "messages": [{"role": "user", "content": "x " * rng.randrange(1, 400)}],
            }
            raw = json.dumps(body).encode()
            headers = {
                "authorization": f"Bearer {tokens[user]}",
                "content-type": "application/json",
                "x-fake-words": str(words),
                "x-fake-prompt-tokens": str(prompt_tokens(raw)),
                "x-bench-user": f"u{user}",
            }
            keep = rng.randrange(1, 5)
            if kind == "leave":  # the model pauses after `keep` words; the client leaves then
                headers["x-fake-stall-after"] = str(keep)
                headers["x-fake-words"] = str(max(words, keep + 1))
            try:
                async with http.stream(
                    "POST", "/v1/chat/completions", content=raw, headers=headers
                ) as resp:
                    key = str(resp.status_code)
                    if kind == "leave" and resp.status_code == 200:
                        seen = 0
                        async for line in resp.aiter_lines():
                            seen += '"content":"' in line and '"content":""' not in line
                            if seen >= keep:
                                key = "left"
                                break  # leaving the block closes the connection
                    else:
                        await resp.aread()
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1

        async def worker() -> None:
            while time.monotonic() < end:
                await one()

        await asyncio.gather(*(worker() for _ in range(opts.concurrency)))


def run(opts: Options) -> Totals:
    """One stress run; the totals, compared (raises nothing for a mismatch: see .ok)."""
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        work = opts.workdir or Path(tmp)
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(opts.hogs)
        ]
        try:
            return _run(opts, work)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()


def _run(opts: Options, work: Path) -> Totals:
    rsa = make_rsa_key("bench-rsa")
    now = int(time.time())
    tokens = [
        mint(
            rsa,
            {
                "iss": "https://idp.test/",
                "aud": "llm-gateway",
                "sub": f"u{i}",
                "org_id": _org(i, opts.users),
                "iat": now,
                "exp": now + 86400,
            },
        )
        for i in range(opts.users)
    ]
    with (
        RedisServer(work / "redis") as redis,
        JwksServer(rsa, make_ec_key("bench-ec")) as jwks,
        FakeLLM.run_in_thread() as fake,
    ):
        services: list[AuthzService] = []
        try:
            for i in range(opts.replicas):
                rdir = work / f"replica{i}"
                rdir.mkdir(parents=True, exist_ok=True)
                policy = rdir / "policy.yaml"
                policy.write_text(
                    POLICY.format(
                        jwks_url=jwks.url,
                        cap=CAP_ORG_UNITS,
                        user=USER_UNITS,
                        journal=rdir / "journal.jsonl",
                    )
                )
                url = f"{redis.url}?lease={opts.lease}"
                services.append(
                    AuthzService(
                        policy,
                        workdir=rdir,
                        env=_ENV,
                        ready_timeout=90,
                        extra_args=["--ledger", url],
                    ).start()
                )
            ports = [s.grpc_port for s in services]

            def endpoints(cfg: dict[str, Any]) -> None:
                authz = cluster(cfg, "authz")
                authz["lb_policy"] = "ROUND_ROBIN"
                if opts.check_timeout:
                    ext_authz = http_filter(cfg, "envoy.filters.http.ext_authz")
                    ext_authz["grpc_service"]["timeout"] = opts.check_timeout
                if opts.message_timeout:
                    http_filter(cfg, "envoy.filters.http.ext_proc")["message_timeout"] = (
                        opts.message_timeout
                    )
                authz["load_assignment"]["endpoints"] = [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": p}
                                    }
                                }
                            }
                            for p in ports
                        ]
                    }
                ]

            config = render_envoy_config(
                listen_port=0,
                admin_port=0,
                authz_port=ports[0],
                upstream_port=fake.port,
                out_path=work / "envoy.yaml",
                mutate=endpoints,
            )
            counts: dict[str, int] = {}
            with EnvoyProcess(config) as envoy:
                started = time.monotonic()
                asyncio.run(_load(opts, envoy.url, tokens, counts))
                elapsed = time.monotonic() - started
                # Every response has ended for the client; the upstream records its end.
                records = _settled_records(fake, sum(counts.values()))
                stats = {
                    k: v
                    for k, v in envoy.stats().items()
                    if v and ("ext_proc" in k or "ext_authz" in k)
                }
            # A Check answer that reached Envoy after its timer (the client got a 503)
            # is a tentative hold that no ext_proc stream confirms (authz.confirm): the
            # replicas' sweep releases it at 0 once ``confirm_s`` (10 s) passed. Wait
            # for that while they run; nothing held is the usual case, and ends it now.
            until = time.monotonic() + CONFIRM_S + 5
            while held_units(redis) and time.monotonic() < until:
                time.sleep(0.2)
            codes = [svc.stop(grace=30.0) for svc in services]
        finally:
            for svc in services:
                svc.stop()
        totals = check_totals(redis, records, opts.users)
        totals.requests, totals.elapsed_s, totals.exit_codes = counts, elapsed, codes
        totals.envoy = stats
        return totals


def _settled_records(fake: Any, sent: int) -> list[Any]:
    """The upstream's records once no more arrive (an aborted stream lands a bit later)."""
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 1.0:
        n = len(fake.records)
        if n != last:
            last, stable_since = n, time.monotonic()
        time.sleep(0.1)
    return list(fake.records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench replicas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--hog", type=int, default=0, help="CPU-bound processes beside the run")
    p.add_argument("--lease", choices=["on", "off"], default="off")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--runs", type=int, default=1, help="repeat; stop at the first failure")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--check-timeout", default="", help="override envoy.yaml's, e.g. 2s")
    p.add_argument("--message-timeout", default="", help="override envoy.yaml's, e.g. 0.5s")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = p.parse_args(argv)
    for i in range(args.runs):
        opts = Options(
            args.replicas,
            args.users,
            args.seconds,
            args.hog,
            args.lease,
            args.concurrency,
            args.seed + i,
            args.workdir,
            check_timeout=args.check_timeout,
            message_timeout=args.message_timeout,
        )
        totals = run(opts)
        print(
            f"run {i + 1}/{args.runs}: replicas={opts.replicas} users={opts.users} "
            f"seconds={opts.seconds:g} hogs={opts.hogs} lease={opts.lease}"
        )
        print(totals.report())
        sys.stdout.flush()
        if not totals.ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
