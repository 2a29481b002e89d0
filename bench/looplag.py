"""``python -m bench looplag``: how late the event loop runs while Checks carry big bodies.

Issue 9 finding 6: one Check whose body is megabytes of tiny messages held the event
loop for its whole parse, so every other tenant's Check waited (past Envoy's 250 ms
ext_authz timeout at 4 MB). This starts a 1 ms ticker on the loop, runs Checks with
such a body through the real Enforcer (memory ledger, no gRPC), and reports how late
the ticker fired while they ran: max and p99. A parse on the loop shows as a lag about
as long as the parse; one off the loop as a few ms (the GIL's switch interval).

Sizes: 1 MiB (what Envoy's ext_authz forwards at most, envoy/envoy.yaml) and 4 MiB
(what a direct caller could send before the cap). With the cap (bounds.request_body_bytes
= 1 MiB) a 4 MiB body is refused unparsed; ``--cap 0`` lifts it to show the lag of a
4 MiB parse off the loop as well.

Self-contained (it writes its own policy and needs nothing else), so it also runs
against an older checkout: copy this file into its ``bench/`` and run
``python -m bench.looplag`` there for the "before" figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

from authz.clock import SystemClock
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.policy.store import PolicyStore

__all__ = ["looplag", "main"]

MIB = 1024 * 1024
KEY = "sk-bench"


def _policy(directory: Path, cap: int) -> Path:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    bounds = f"bounds: {{request_body_bytes: {cap}}}\n" if cap else ""
    path = directory / "policy.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: b, sha256: {digest}, claims: {{org_id: acme, sub: bench}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets: [{{name: org, match: {{org: acme}}, tokens: 1000000000000, period: day}}]
models:
  rules: [{{match: "gpt-*", max_output_tokens: 64}}]
{bounds}""")
    return path


def tiny_messages_body(size: int) -> bytes:
    """A chat body of about ``size`` bytes made of one-character messages (~30 B each)."""
    one = {"role": "user", "content": "a"}
    per = len(json.dumps(one, separators=(",", ":"))) + 1
    body = {"model": "gpt-4o", "messages": [one] * max(1, (size - 64) // per)}
    return json.dumps(body, separators=(",", ":")).encode()


async def _measure(enforcer: Enforcer, body: bytes, rounds: int) -> dict[str, float]:
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # the ticker settles in
    lags.clear()
    req = CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, body)
    took = []
    verdict = ""
    for _ in range(rounds):
        start = time.perf_counter()
        decision = await enforcer.check(req)
        took.append(time.perf_counter() - start)
        verdict = f"{decision.verdict.value} {decision.status}"
        await asyncio.sleep(0.01)  # one Check at a time: the lag is what one body costs
    running = False
    await task
    ordered = sorted(lags) or [0.0]
    return {
        "check_ms": statistics.mean(took) * 1000,
        "lag_max_ms": ordered[-1] * 1000,
        "lag_p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "ticks": float(len(lags)),
        "verdict": verdict,  # type: ignore[dict-item]
    }


async def _run(sizes: list[int], rounds: int, cap: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        clock = SystemClock()
        enforcer = Enforcer(PolicyStore(_policy(Path(tmp), cap)), MemoryLedger(clock), clock)
        for size in sizes:
            body = tiny_messages_body(size)
            await _measure(enforcer, body, 1)  # warm-up
            row: dict[str, object] = {"body_bytes": len(body)}
            row.update(await _measure(enforcer, body, rounds))
            out.append(row)
        await enforcer.aclose()
    return out


def _bomb(mib: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(z.compress(bytes(MIB)) for _ in range(mib)) + z.flush()


async def _bomb_lag(mib: int) -> dict[str, object]:
    """The lag while the response path reads a gzip body inflating to ``mib`` MiB."""
    from authz.apis import Api
    from authz.settle import ReservationInfo, ResponseTracker

    data = _bomb(mib)
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    lags.clear()
    tracker = ResponseTracker(ReservationInfo("r@acme", Api.OPENAI_CHAT, 40, 500))
    tracker.on_headers(200, "application/json", "gzip")
    start = time.perf_counter()
    if hasattr(tracker, "feed"):
        outcome = await tracker.feed(data, True)
    else:  # before the fix
        outcome = tracker.on_body(data, True)
    took = time.perf_counter() - start
    await asyncio.sleep(0.01)
    running = False
    await task
    ordered = sorted(lags) or [0.0]
    charged = f"{outcome.kind} {outcome.usage.total}" if outcome else "nothing"
    return {"bomb_bytes": len(data), "decoded_mib": mib, "read_ms": took * 1000,
            "lag_max_ms": ordered[-1] * 1000, "outcome": charged}  # fmt: skip


def looplag(sizes_mib: list[float], rounds: int = 5, cap: int = -1) -> list[dict[str, object]]:
    """Rows of figures per body size. ``cap``: -1 the policy's default, 0 lifted (16 MiB),
    else bounds.request_body_bytes."""
    cap_bytes = {-1: 0, 0: 16 * MIB}.get(cap, cap)
    return asyncio.run(_run([int(s * MIB) for s in sizes_mib], rounds, cap_bytes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench looplag", description=__doc__)
    p.add_argument("--sizes", default="1,4", help="body sizes in MiB, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="checks per size")
    p.add_argument("--cap", type=int, default=-1,
                   help="bounds.request_body_bytes: -1 policy default, 0 lifted")  # fmt: skip
    p.add_argument("--bomb", type=int, default=0,
                   help="also: the lag while reading a gzip bomb of this many MiB")  # fmt: skip
    args = p.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    print(f"{'body':>10} {'verdict':>10} {'check ms':>9} {'lag max ms':>11} {'lag p99 ms':>11}")
    for row in looplag(sizes, args.rounds, args.cap):
        print(f"{row['body_bytes']:>10} {row['verdict']!s:>10} {row['check_ms']:>9.1f} "
              f"{row['lag_max_ms']:>11.1f} {row['lag_p99_ms']:>11.1f}")  # fmt: skip
    if args.bomb:
        row = asyncio.run(_bomb_lag(args.bomb))
        print(f"gzip bomb: {row['bomb_bytes']} bytes -> {row['decoded_mib']} MiB: read in "
              f"{row['read_ms']:.1f} ms, lag max {row['lag_max_ms']:.1f} ms, "
              f"charged {row['outcome']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
