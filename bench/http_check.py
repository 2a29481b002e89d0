"""The HTTP check API against the gRPC Check of the same running service: checks/s and
latency, same request, same concurrency, one after the other.

    python -m authz serve --config examples/policy.yaml &   # or scripts/serve
    python -m bench.http_check --key sk-... --n 4000 --concurrency 32

The key must be in the policy (``identity.api_keys``) with budget enough for ``n``
allowed checks of each kind (nothing is settled: reservations expire).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import grpc

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

BODY = json.dumps({"model": "gpt-4o", "max_tokens": 10,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip


async def _run(n: int, conc: int, one: Callable[[], Awaitable[bool]]) -> tuple[float, list[float]]:
    lat: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            assert await one()
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return n / (time.perf_counter() - start), sorted(lat)


def _report(name: str, rps: float, lat: list[float]) -> None:
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(f"{name:5} {rps:8.0f} checks/s  p50 {p(0.5):6.2f} ms  p99 {p(0.99):6.2f} ms"
          f"  mean {statistics.fmean(lat) * 1000:6.2f} ms")  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", required=True)
    ap.add_argument("--grpc", default="127.0.0.1:9191")
    ap.add_argument("--http", default="http://127.0.0.1:9193")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    headers = {"authorization": f"Bearer {a.key}", "content-type": "application/json"}
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", headers=headers, raw_body=BODY)
    req = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)))  # fmt: skip
    async with grpc.aio.insecure_channel(a.grpc) as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)

        async def by_grpc() -> bool:
            return (await stub.Check(req, timeout=10)).status.code == 0

        _report("grpc", *await _run(a.n, a.concurrency, by_grpc))
    conn = aiohttp.TCPConnector(limit=a.concurrency)
    async with aiohttp.ClientSession(a.http, connector=conn) as s:

        async def by_http() -> bool:
            async with s.post("/check/v1/chat/completions", data=BODY, headers=headers) as r:
                await r.read()
                return r.status == 200

        _report("http", *await _run(a.n, a.concurrency, by_http))


if __name__ == "__main__":
    asyncio.run(main())
