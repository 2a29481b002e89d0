"""Configuration (b): a no-op ext_authz server, the floor for any Python gRPC service.

grpc.aio on uvloop, one pre-built OK answer, nothing else: no parsing beyond what grpc
does itself, no logging, no metrics. What authz costs on top of this is what our own
code costs. ``--workers N`` forks N processes on one port (SO_REUSEPORT), like
``authz serve --workers N``, so 1-vs-2 worker runs have a floor to compare with.

    python -m bench.noop_authz --port 9191 [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

import grpc
from google.rpc import status_pb2

from authz.proto import external_auth_pb2 as pb
from authz.proto import external_auth_pb2_grpc as pb_grpc

_OK = pb.CheckResponse(status=status_pb2.Status(code=0), ok_response=pb.OkHttpResponse())


class NoopAuthz(pb_grpc.AuthorizationServicer):
    async def Check(
        self, request: pb.CheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckResponse:
        return _OK


async def _serve(port: int, reuse_port: bool) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_AuthorizationServicer_to_server(NoopAuthz(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"noop ext_authz pid {os.getpid()} on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.workers > 1:
        cmd = [sys.executable, "-m", "bench.noop_authz", "--port", str(args.port), "--reuse-port"]
        children = [subprocess.Popen(cmd) for _ in range(args.workers)]

        def forward(sig: int, _frame: object) -> None:
            for c in children:
                c.send_signal(sig)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return max(c.wait() for c in children)
    import uvloop

    uvloop.run(_serve(args.port, args.reuse_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
