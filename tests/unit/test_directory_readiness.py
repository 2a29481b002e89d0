"""/readyz and /metrics with a directory: down with on_down deny is not ready; with
last_known or fallback it is ready and says degraded; the series always exist."""

from __future__ import annotations

import pytest

from authz.directory.stats import DirectoryStats
from authz.readiness import Readiness
from authz.telemetry.metrics import Metrics

pytestmark = pytest.mark.unit


def ready(stats: DirectoryStats | None) -> tuple[bool, dict[str, object]]:
    r = Readiness(None, "MemoryLedger")
    r.serving = True
    r.directory = stats
    return r.state()


def test_no_directory_no_note() -> None:
    assert ready(None) == (True, {"status": "ready", "ledger": {"backend": "MemoryLedger"}})
    assert "directory" not in ready(DirectoryStats(configured=False))[1]


@pytest.mark.parametrize(("mode", "ok", "status"), [
    ("last_known", True, "degraded"), ("fallback", True, "degraded"), ("deny", False, "not ready"),
])  # fmt: skip
def test_directory_down(mode: str, ok: bool, status: str) -> None:
    stats = DirectoryStats(on_down_mode=mode)
    assert ready(stats)[1]["status"] == "ready"
    stats.went_down("connection refused")
    is_ready, body = ready(stats)
    assert (is_ready, body["status"]) == (ok, status)
    assert body["directory"] == {"up": False, "on_down": mode,
                                 "last_error": "connection refused", "cached_subjects": 0}  # fmt: skip


def test_metrics_series_exist_without_a_directory() -> None:
    m = Metrics()
    m.watch_directory(DirectoryStats(configured=False))
    text = m.render().decode()
    assert 'authz_directory_lookups_total{outcome="timeout"} 0.0' in text
    assert 'authz_directory_cache_total{result="last_known"} 0.0' in text
    assert "authz_directory_up 1.0" in text
