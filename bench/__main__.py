"""``python -m bench [run|profile|memory|micro|looplag|replicas]``: see docs/performance.md."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bench.wrk import BenchError, find_wrk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="mode")
    for name, text in (
        ("run", "saturation (a)-(f), fixed rate, 1 vs 2 workers, LiteLLM (the default)"),
        ("profile", "py-spy on the authz service under load in configuration (c)"),
        ("memory", "RSS of the service after 100k and after N checks (long)"),
        ("micro", "the Python cost of one check, in process, phase by phase"),
        ("looplag", "event-loop lag while Checks carry 1 and 4 MiB bodies"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
        s.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per run")
        s.add_argument("--connections", type=int, default=32)
        s.add_argument("--users", type=int, default=1000, help="distinct users (JWTs)")
        s.add_argument("--out", type=Path, default=Path("bench/results"))
        if name == "run":
            s.add_argument("--only", default="", help="comma-separated keys: a,b,c,d,e,f,peer")
            s.add_argument("--no-workers", action="store_true")
            s.add_argument("--no-rate", action="store_true")
            s.add_argument("--no-peer", action="store_true")
        if name == "memory":
            s.add_argument("--checks", type=int, default=1_000_000)
            s.add_argument("--idle", action="store_true", help="N users once each, then idle")
            s.add_argument("--idle-users", type=int, default=200_000)
            s.add_argument("--idle-wait", type=float, default=240.0, help="seconds idle")
            s.add_argument("--warm-checks", type=int, default=60_000)
            s.add_argument("--ledger", choices=["memory", "sqlite"], default="memory")
        if name == "micro":
            s.add_argument("--checks", type=int, default=20_000)
    argv = argv if argv is not None else (sys.argv[1:] or ["run"])
    if argv[0] == "replicas":  # its own options (bench/replicas.py); needs no wrk
        from bench.replicas import main as replicas

        return replicas(argv[1:])
    if argv[0] == "looplag":  # its own options (bench/looplag.py); needs no wrk
        from bench.looplag import main as looplag

        return looplag(argv[1:])
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.mode == "micro":
            from bench.micro import micro

            return micro(args)
        find_wrk()
        if args.mode == "profile":
            from bench.profile import profile

            return profile(args)
        if args.mode == "memory":
            from bench.memory import idle, memory

            return idle(args) if args.idle else memory(args)
        from bench.run import Options, bench_run

        only = tuple(k for k in args.only.split(",") if k)
        return bench_run(
            Options(
                duration_s=args.duration,
                warmup_s=args.warmup,
                connections=args.connections,
                users=args.users,
                only=only,
                workers=not args.no_workers,
                rate=not args.no_rate,
                peer=not args.no_peer,
                out=args.out,
            )
        )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
