"""``--drain-timeout`` reaches the server's graceful stop: how long SIGTERM lets Checks
and ext_proc streams in flight run before they are cut (k8s/ sizes its grace period
from it; overlays/redis waits 300 s for long streams)."""

from __future__ import annotations

import pytest

import authz.server
from authz.cli import main
from authz.server import ServeOptions

pytestmark = pytest.mark.unit


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServeOptions]:
    seen: list[ServeOptions] = []

    async def fake_serve(opts: ServeOptions) -> None:
        seen.append(opts)

    monkeypatch.setattr(authz.server, "serve", fake_serve)
    return seen


def test_drain_timeout_flag_sets_the_grace(captured: list[ServeOptions]) -> None:
    assert main(["serve", "--config", "p.yaml", "--drain-timeout", "300"]) == 0
    assert captured[0].grace_s == 300.0


def test_drain_timeout_from_the_environment(
    captured: list[ServeOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHZ_DRAIN_TIMEOUT", "42.5")
    assert main(["serve", "--config", "p.yaml"]) == 0
    assert captured[0].grace_s == 42.5


def test_default_drain_is_unchanged(captured: list[ServeOptions]) -> None:
    assert main(["serve", "--config", "p.yaml"]) == 0
    assert captured[0].grace_s == ServeOptions(config="p.yaml").grace_s == 10.0
