"""The fake upstream's reset() is a clean slate: a stream the last test left open, ending
after the reset, is not recorded into the next test's records (it once was, and a later
test's totals then counted a request it never sent)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.support.fake_llm import FakeLLM

pytestmark = pytest.mark.integration


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (a counter on the same loop; no event to await)
            await asyncio.sleep(0.01)


async def test_a_stream_open_across_reset_is_not_recorded_after_it() -> None:
    fake = FakeLLM()
    await fake.start()
    try:
        async with httpx.AsyncClient(base_url=fake.url, timeout=30) as client:
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            old = asyncio.create_task(
                client.post("/v1/chat/completions", json=body, headers={"x-fake-hold": "h"})
            )
            await _until(lambda: fake.in_flight >= 1)
            fake.reset()  # the next test begins; it releases the held stream
            response = await old
            assert response.status_code == 200 and "data:" in response.text
            await _until(lambda: fake.in_flight == 0)
            assert fake.records == []
            # what arrives after the reset is recorded as before
            new = await client.post("/v1/chat/completions", json={**body, "stream": False})
            assert new.status_code == 200
            records = await fake.wait_records(1, timeout=30)
            assert [r.status for r in records] == [200]
    finally:
        await fake.stop()
