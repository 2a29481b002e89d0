"""The breaker as an operator sees it, in the real ``authz serve`` process on real Redis.

A journal left by a previous process is replayed at start-up; when Redis goes away the
expiry sweep trips the breaker (``failures: 1``), which shows in ``/readyz`` (still 200),
in ``/metrics`` and as one log line; SIGTERM still stops the service cleanly.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authz.clock import SystemClock
from authz.ledger import Limit, open_ledger
from authz.ledger.entries import ChargeEntry, encode
from authz.policy.model import Weights
from authz.usage.types import TokenUsage
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService

pytestmark = pytest.mark.integration

POLICY = """
version: 1
identity:
  api_keys:
    - {{name: a, sha256: {digest}, claims: {{org_id: acme, sub: a}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: org-day, match: {{org: acme}}, tokens: 1000000, period: day}}
ledger:
  url: {url}
  breaker: {{failures: 1, open_s: 60, mode: fail_open, journal_path: {journal}}}
"""


def _wait(what: str, fn: Callable[[], Any], limit_s: float = 15.0) -> Any:
    deadline = time.monotonic() + limit_s
    while not (out := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return out


def _ledger(svc: AuthzService) -> dict[str, Any]:
    status, body = svc.http_get("/readyz")
    assert status == 200, body
    out: dict[str, Any] = json.loads(body)["ledger"]
    return out


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def test_service_replays_at_start_and_reports_an_open_breaker(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        url = redis.url + "?lease=off"
        journal = tmp_path / "state" / "journal.jsonl"
        journal.parent.mkdir()
        limit = Limit(
            "org-day|org:acme|0", "org-day", "org:acme", 10**6, time.time() + 3600, Weights()
        )
        # What a previous process could not write before it stopped: 100 local charges.
        journal.write_bytes(
            b"".join(
                encode(ChargeEntry(f"local:old{i}", (limit,), TokenUsage(3, 0, 4)), 0)
                for i in range(100)
            )
        )
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(digest="a" * 64, url=url, journal=journal))
        with AuthzService(policy, workdir=tmp_path) as svc:
            # The replay's counters move when it ends, a moment after the journal is
            # empty (its last read): wait for the end, or a busy machine reads between.
            _wait("the start-up replay", lambda: _ledger(svc)["replayed_entries"] == 100)
            led = _ledger(svc)
            assert (led["state"], led["mode"], led["journal_entries"]) == (
                "closed",
                "fail_open",
                0,
            )
            text = svc.metrics_text()
            assert _metric(text, "authz_ledger_breaker_state") == 0
            assert _metric(text, "authz_journal_replays_total") == 1
            assert _metric(text, "authz_journal_replayed_entries_total") == 100
            reader = open_ledger(url, SystemClock())
            assert (await reader.balance(limit)).used == 700
            await reader.close()

            redis.stop()  # the next expiry sweep (every second) fails: the breaker opens
            led = _wait("the breaker to open", lambda: (x := _ledger(svc))["state"] == "open" and x)
            assert led["opened"] == 1 and "redis" in led["last_error"]
            assert _metric(svc.metrics_text(), "authz_ledger_breaker_state") == 2
            assert svc.stop() == 0  # graceful, breaker open or not
        lines = [ln for ln in svc.stderr_text().splitlines() if "ledger breaker" in ln]
        assert len(lines) == 1 and json.loads(lines[0])["msg"].startswith(
            "ledger breaker closed -> open"
        )
