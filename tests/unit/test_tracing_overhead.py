"""What tracing costs a Check: off (the default), and on.

Run the micro-benchmark (prints microseconds per Check)::

    python -m tests.unit.test_tracing_overhead

It times the ext_authz servicer's ``Check`` (and the release of its reservation, so the
ledger stays small) on one event loop, three ways, interleaved so drift hits all alike: ``direct`` calls the undecorated pipeline (``_check``: the
enforcer, metrics and the response, no tracing code at all); ``off`` is ``Check`` with
tracing unconfigured (what every deployment without ``OTEL_*`` runs); ``on`` is ``Check``
with a recording tracer and a span processor that drops the spans (the SDK's own cost,
without export). ``off - direct`` is the whole price of tracing being available.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from authz.telemetry.tracing import Tracing
from tests.unit.test_tracing import ENVOY_SPAN, TRACE, Ctx, _build, _check_request

pytestmark = pytest.mark.unit


class _Drop(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        pass


async def measure(rounds: int = 20, per_round: int = 500) -> dict[str, float]:
    """Median microseconds per Check for direct / off / on."""
    tmp = Path(tempfile.mkdtemp())
    provider = TracerProvider()
    provider.add_span_processor(_Drop())
    tracing = Tracing(provider.get_tracer("bench"))
    (tmp / "off").mkdir()
    (tmp / "on").mkdir()
    off_enforcer, off, _ = _build(tmp / "off", None)
    on_enforcer, on, _ = _build(tmp / "on", tracing)
    req = _check_request({"traceparent": f"00-{TRACE}-{ENVOY_SPAN}-01"},
                         {"model": "gpt-4o", "max_tokens": 0, "messages": []})  # fmt: skip
    ctx = Ctx({"traceparent": f"00-{TRACE}-{ENVOY_SPAN}-01"})

    # Each Check's reservation is released right away, so the ledger stays the same size.
    async def direct() -> Any:
        resp = await off._check(req, ctx, None)
        await off_enforcer.release(resp.dynamic_metadata.fields["reservation_id"].string_value)

    async def off_check() -> Any:
        resp = await off.Check(req, ctx)
        await off_enforcer.release(resp.dynamic_metadata.fields["reservation_id"].string_value)

    async def on_check() -> Any:
        resp = await on.Check(req, ctx)
        await on_enforcer.release(resp.dynamic_metadata.fields["reservation_id"].string_value)

    ways: dict[str, Callable[[], Awaitable[Any]]] = {
        "direct": direct, "off": off_check, "on": on_check,
    }  # fmt: skip
    samples: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():  # warm caches (JIT-less, but dicts, label children, windows)
        for _ in range(50):
            await fn()
    order = list(ways.items())
    for _ in range(rounds):
        order.reverse()  # alternate, so drift does not favour one way
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(per_round):
                await fn()
            samples[name].append((time.perf_counter() - start) / per_round * 1e6)
    provider.shutdown()
    return {k: statistics.median(v) for k, v in samples.items()}


async def test_benchmark_runs() -> None:
    figures = await measure(rounds=2, per_round=20)
    assert set(figures) == {"direct", "off", "on"} and all(v > 0 for v in figures.values())


def main() -> None:
    figures = asyncio.run(measure())
    for name, us in figures.items():
        print(f"{name:>6}: {us:7.1f} us per Check")
    print(f"tracing off costs {figures['off'] - figures['direct']:+.2f} us per Check; "
          f"on (no export) {figures['on'] - figures['direct']:+.1f} us")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
