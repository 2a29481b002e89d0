"""Alerts driven by a fake clock through the real enforcer and ledger; webhooks over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.alerts import Alert, AlertEngine, WebhookSender
from authz.alerts.webhook import backoff
from authz.clock import FakeClock
from authz.enforcer import CheckInput, Enforcer
from authz.ledger import MemoryLedger
from authz.policy.observability import Webhook
from authz.policy.store import PolicyStore
from authz.telemetry.metrics import Metrics
from authz.usage.types import TokenUsage
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.unit

SECRET = "test-hook-secret"
DAY0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a day window starts here
HOUR = 3600.0


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _policy(tmp_path: Path, alerts: str, budgets: str = "", extra: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: a, sha256: {_key("k-ann")}, claims: {{org_id: acme, department: research, sub: ann}}}}
    - {{name: b, sha256: {_key("k-bo")}, claims: {{org_id: acme, department: research, sub: bo}}}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  {budgets or '- {name: dept-day, match: {department: "*"}, tokens: 1000, period: day}'}
  - {{name: user-day, match: {{user: "*"}}, tokens: 1000000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 1}}]
{extra}
alerts:
{alerts}
""")
    return path


class Harness:
    """Enforcer + memory ledger + alert engine on one fake clock; ``spend`` really spends."""

    def __init__(self, path: Path, sinks: list[object] | None = None) -> None:
        self.clock = FakeClock(DAY0)
        self.metrics = Metrics()
        self.ledger = MemoryLedger(self.clock)
        store = PolicyStore(path)
        self.fired: list[Alert] = []
        self.engine = AlertEngine(
            lambda: store.current, self.ledger, self.clock, self.metrics,
            sinks=[self, *(sinks or [])],  # type: ignore[list-item]
        )  # fmt: skip
        self.enforcer = Enforcer(store, self.ledger, self.clock, observer=self.engine)

    def send(self, alert: Alert) -> None:
        self.fired.append(alert)

    async def spend(self, units: int, key: str = "k-ann") -> None:
        body = json.dumps({"model": "gpt-4o", "max_tokens": 1, "messages": []}).encode()
        d = await self.enforcer.check(
            CheckInput("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"}, body)
        )
        assert d.reservation_id, d.message
        assert await self.enforcer.settle(d.reservation_id, TokenUsage(units, 0, 0))

    async def at(self, hour: float, spend: int = 0) -> list[str]:
        """Move to ``hour`` after the day's start, spend, tick: the ids fired now."""
        self.clock.set(DAY0 + hour * HOUR)
        if spend:
            await self.spend(spend)
        return sorted(a.id.split("|")[0] for a in await self.engine.tick())

    def gauge(self, budget: str, node: str) -> float:
        return float(self.metrics.budget_used.labels(budget, node)._value.get())


ALL_RULES = """
  levels: [department]
  thresholds: [50, 80, 100]
  predictive: {min_elapsed: 0.05, lookback_s: 3600}
  anomaly: false
  cost_variance: false
"""
NODE = "org:acme/department:research"


async def test_even_pace_crosses_thresholds_once_each_and_never_predicts(tmp_path: Path) -> None:
    h = Harness(_policy(tmp_path, ALL_RULES))
    fired: dict[int, list[str]] = {}
    for hour in range(1, 24):  # 40 units an hour: 960 by midnight, never out
        fired[hour] = await h.at(hour, spend=40)
    assert fired[13] == ["threshold:50:dept-day"]  # 520 of 1000
    assert fired[20] == ["threshold:80:dept-day"]  # 800
    assert all(not ids for hour, ids in fired.items() if hour not in (13, 20))
    assert h.gauge("dept-day", NODE) == pytest.approx(0.92)
    # user-level budgets are not watched (levels: [department]), and no gauge for users
    assert all(a.budget == "dept-day" for a in h.fired)
    assert 'node="org:acme/department:research/user:ann"' not in h.metrics.render().decode()


async def test_a_new_period_alerts_again(tmp_path: Path) -> None:
    h = Harness(_policy(tmp_path, ALL_RULES))
    assert await h.at(12, spend=480) == []
    assert await h.at(13, spend=40) == ["threshold:50:dept-day"]
    assert await h.at(14, spend=10) == []
    assert await h.at(37, spend=520) == ["threshold:50:dept-day"]  # the next day, 40/h
    first, second = h.fired
    assert first.id != second.id and second.period_start == DAY0 + 24 * HOUR


async def test_exhausted_budget_alerts_once_when_it_refuses(tmp_path: Path) -> None:
    h = Harness(_policy(tmp_path, ALL_RULES.replace("[50, 80, 100]", "[100]")))
    h.clock.set(DAY0 + 23 * HOUR)
    await h.spend(1000)
    body = json.dumps({"model": "gpt-4o", "max_tokens": 1, "messages": []}).encode()
    for _ in range(3):  # 1 unit left: every check is refused
        d = await h.enforcer.check(
            CheckInput("POST", "/v1/chat/completions", {"authorization": "Bearer k-ann"}, body)
        )
        assert d.reason is not None and d.reason.value == "budget_exhausted"
    assert await h.engine.tick()
    assert sorted(a.kind for a in h.fired) == ["exhausted", "threshold"]
    exhausted = next(a for a in h.fired if a.kind == "exhausted")
    assert "is refusing requests (0 of 1000 left); it resets in 1h00m" in exhausted.message
    assert await h.engine.tick() == []


async def test_fake_clock_drives_past_80_percent_and_predicted_exhaustion_one_signed_webhook_each(
    tmp_path: Path,
) -> None:
    with WebhookReceiver(fail_first=1) as hooks:
        rules = ALL_RULES + f'  webhooks: [{{url: "{hooks.url}", secret_env: HOOK_SECRET}}]\n'
        path = _policy(tmp_path, rules)
        delays: list[float] = []

        async def no_wait(seconds: float) -> None:  # backoff is recorded, not slept
            delays.append(seconds)

        store_hooks = PolicyStore(path).current.alerts.webhooks
        h = Harness(path)
        sender = WebhookSender(lambda: store_hooks, h.clock, h.metrics,
                               env={"HOOK_SECRET": SECRET}, sleep=no_wait)  # fmt: skip
        h.engine._sinks = (*h.engine._sinks, sender)

        assert await h.at(6, spend=240) == []  # 40/h: on pace for 960 by midnight
        assert await h.at(13, spend=280) == ["threshold:50:dept-day"]  # 520, still 40/h
        # A burst: 200 in the last hour. At that rate 280 more last 1.4 h, not 11 h.
        assert await h.at(14, spend=200) == ["predicted_exhaustion:dept-day"]
        assert await h.at(15, spend=100) == ["threshold:80:dept-day"]  # 820
        assert await h.at(16, spend=50) == []  # all three already fired this period
        await sender.drain()

        predicted = next(a for a in h.fired if a.kind == "predicted_exhaustion")
        assert predicted.details["rate_per_hour"] == pytest.approx(200.0)
        assert predicted.details["runs_out_at"] == DAY0 + 14 * HOUR + 1.4 * HOUR
        assert "will run out in about 1h24m" in predicted.message

        ids = [a.id for a in h.fired]
        assert len(ids) == 3 == len(set(ids))
        for alert_id in ids:
            tries = [r for r in hooks.requests if r.headers["x-authz-delivery"] == alert_id]
            assert [r.status for r in tries] == [500, 200], "one failed attempt, one delivery"
            for r in tries:
                mac = hmac.new(SECRET.encode(), r.headers["x-authz-timestamp"].encode() + b"."
                               + r.body, hashlib.sha256).hexdigest()  # fmt: skip
                assert r.headers["x-authz-signature"] == f"sha256={mac}"
                assert r.json["id"] == alert_id and r.path == "/hooks/authz"
        assert len(hooks.delivered) == 3
        assert delays == [backoff(1)] * 3 == [1.0] * 3
        assert h.metrics.alert_deliveries.labels("ok")._value.get() == 3
        assert h.metrics.alert_deliveries.labels("retry")._value.get() == 3
        assert h.metrics.alerts.labels("threshold")._value.get() == 2
        await sender.close()


async def test_anomaly_against_the_nodes_own_baseline(tmp_path: Path) -> None:
    rules = """
  levels: [department]
  thresholds: [90]
  predictive: false
  cost_variance: false
  anomaly: {factor: 3, bucket_s: 3600, baseline_buckets: 3, min_history: 3, min_units: 100}
"""
    budgets = '- {name: dept-day, match: {department: "*"}, tokens: 100000, period: day}'
    h = Harness(_policy(tmp_path, rules, budgets))
    for hour in (0.5, 1.5, 2.5):
        assert await h.at(hour, spend=50) == []  # building history (min_history: 3)
    assert await h.at(3.5, spend=140) == []  # 140 < 3 x 50
    assert await h.at(4.5, spend=400) == ["anomaly:dept-day"]
    assert h.fired[0].details == {"bucket_units": 400, "baseline_units": pytest.approx(80.0),
                                  "factor": 3.0}  # fmt: skip
    assert await h.at(5.5, spend=900) == []  # once per budget and period


async def test_cost_variance_on_a_cost_budget(tmp_path: Path) -> None:
    rules = """
  levels: [department]
  thresholds: [90]
  predictive: false
  anomaly: false
  cost_variance: {percent: 25, min_elapsed: 0.1}
"""
    budgets = '- {name: dept-cost, match: {department: "*"}, cost: 10, period: day}'
    prices = "prices:\n  currency: EUR\n  models: [{match: 'gpt-*', input: 1000, output: 1000}]"
    h = Harness(_policy(tmp_path, rules, budgets, prices))
    assert await h.at(2, spend=1000) == []  # before min_elapsed (10% of the day)
    assert await h.at(6, spend=3000) == ["cost_variance:dept-cost"]  # 4 EUR vs 2.50 planned
    alert = h.fired[0]
    assert alert.unit == "cost" and alert.details["currency"] == "EUR"
    assert alert.used == 4_000_000 and alert.amount == 10_000_000  # micro-units
    assert alert.message == (
        "Cost budget 'dept-cost' for org:acme/department:research: 4.00 EUR spent, 60% above "
        "the even-pace plan of 2.50 EUR at 25% of the period."
    )
    assert await h.at(7, spend=100) == []


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


def _alert() -> Alert:
    return Alert("threshold:50:b|org:acme|0", "threshold", "b", "org:acme", "tokens", 500, 1000,
                 DAY0, DAY0 + 86400, DAY0 + 100, "half", threshold=50)  # fmt: skip


@pytest.mark.integration
async def test_webhook_gives_up_on_a_4xx_and_never_sends_unsigned(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    metrics, clock = Metrics(), FakeClock(DAY0)
    receiver.fail_first, receiver.fail_status = 10, 400
    hook = Webhook(receiver.url, "HOOK_SECRET", max_attempts=4)
    sender = WebhookSender(lambda: (hook,), clock, metrics, env={"HOOK_SECRET": "s"})
    sender.send(_alert())
    await sender.drain()
    assert len(receiver.requests) == 1  # a 400 is the receiver's final word
    unsigned = WebhookSender(lambda: (hook,), clock, metrics, env={})
    unsigned.send(_alert())
    await unsigned.drain()
    assert len(receiver.requests) == 1 and "HOOK_SECRET is not set" in caplog.text
    assert metrics.alert_deliveries.labels("failed")._value.get() == 2
    await sender.close()
    await unsigned.close()


@pytest.mark.integration
async def test_webhook_retries_5xx_with_backoff_up_to_max_attempts(
    receiver: WebhookReceiver,
) -> None:
    delays: list[float] = []

    async def no_wait(seconds: float) -> None:
        delays.append(seconds)

    receiver.fail_first = 10
    hook = Webhook(receiver.url, "HOOK_SECRET", max_attempts=4)
    sender = WebhookSender(lambda: (hook,), FakeClock(DAY0), Metrics(), env={"HOOK_SECRET": "s"},
                           sleep=no_wait)  # fmt: skip
    sender.send(_alert())
    await sender.drain()
    assert [r.headers["x-authz-attempt"] for r in receiver.requests] == ["1", "2", "3", "4"]
    assert delays == [1.0, 2.0, 4.0]
    await sender.close()
