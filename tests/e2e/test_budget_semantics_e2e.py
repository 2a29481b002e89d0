"""Issue 16 through the real Envoy, the real openai SDK and a real Redis (edge leases off,
the default, and on): a policy edit keeps what was spent, an audit-only budget never
refuses but says it would have, and a rollover budget opens with last period's unused part.

The remaining budget is read as a client reads it: the ``x-ratelimit-remaining-tokens``
of a 429 for a request larger than what is left (``over_reserve: deny``).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from authz.admission import plan_limits
from authz.clock import FakeClock
from authz.ledger import Limit, Reservation, open_ledger
from authz.policy.loader import load_policy
from authz.policy.model import Node, Policy, SubjectPath
from authz.policy.periods import PeriodWindows
from authz.usage.types import TokenUsage
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.redis_proc import RedisServer
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e

KEY = "sk-demo-alice"
POLICY = """
version: 1
timezone: {tz}
identity:
  api_keys:
    - {{name: demo-alice, sha256: 32a642c5fd761670c7f9989b70138c93c56ea519529eb544d46b91a8e59f3075,
       claims: {{org_id: acme, department: research, sub: alice}}}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: {name}, match: {{user: "*"}}, tokens: {tokens}, period: day, over_reserve: deny{extra}}}
  - {{name: research-watch, match: {{department: research}}, tokens: 1500, period: day,
     enforce: false}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 100}}]
ledger: {{url: "{url}"}}
"""
ALICE = SubjectPath((Node("org", "acme"), Node("department", "research"), Node("user", "alice")))
HI = [{"role": "user", "content": "hi"}]


def policy(url: str, tz: str = "Europe/Berlin", name: str = "user-daily", tokens: int = 20_000,
           extra: str = "") -> str:  # fmt: skip
    return POLICY.format(tz=tz, name=name, tokens=tokens, extra=extra, url=url)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(params=["off", "on"], ids=["leases-off", "leases-on"])
def url(request: pytest.FixtureRequest, redis_server: RedisServer) -> str:
    """The service's ledger: one Redis, with edge leases off (the default) or on."""
    return f"{redis_server.url}?lease={request.param}&lease_flush_ms=10"


def _start(workdir: Path, port: int, text: str) -> AuthzService:
    (workdir / "policy.yaml").write_text(text)
    return AuthzService(workdir / "policy.yaml", grpc_port=port, workdir=workdir,
                        extra_args=["--state-dir", str(workdir)])  # fmt: skip


@pytest.fixture
def client(envoy: EnvoyProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY, max_retries=0,
                       timeout=30) as c:  # fmt: skip
        yield c


def _settled(svc: AuthzService, n: int) -> None:
    def done() -> bool:
        m = re.search(r'^authz_settlements_total\{outcome="settled"\} (\S+)$',
                      svc.metrics_text(), re.M)  # fmt: skip
        return m is not None and float(m.group(1)) >= n

    wait_until(done, timeout=15, what=f"{n} settlements")


def _reloaded(svc: AuthzService, n: int) -> None:
    wait_until(lambda: svc.stderr_text().count("policy reloaded from") >= n, timeout=15,
               what=f"reload {n}")  # fmt: skip


def _spend(client: openai.OpenAI, svc: AuthzService, n: int) -> None:
    """1,040 tokens: 40 in, 1,000 out, as the upstream reports them."""
    client.chat.completions.create(
        model="gpt-4o", max_tokens=1000, messages=HI,  # type: ignore[arg-type]
        extra_headers={"x-fake-prompt-tokens": "40", "x-fake-words": "1000"},
    )  # fmt: skip
    _settled(svc, n)


def _remaining(client: openai.OpenAI) -> int:
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", max_tokens=90_000, messages=HI)  # type: ignore[arg-type]
    return int(err.value.response.headers["x-ratelimit-remaining-tokens"])


def test_edits_mid_window_keep_what_was_spent(
    client: openai.OpenAI, authz_port: int, workdir: Path, url: str, fake_llm: FakeLLMThread
) -> None:
    with _start(workdir, authz_port, policy(url)) as svc:
        _spend(client, svc, 1)
        assert _remaining(client) == 20_000 - 1040
        # Renamed (with renamed_from), raised, and in another timezone: one reload.
        (workdir / "policy.yaml").write_text(policy(
            url, tz="Asia/Tokyo", name="alice-daily", tokens=30_000,
            extra=", renamed_from: user-daily",
        ))  # fmt: skip
        svc.send_signal(signal.SIGHUP)
        _reloaded(svc, 1)
        assert _remaining(client) == 30_000 - 1040
        _spend(client, svc, 2)
        assert _remaining(client) == 30_000 - 2080  # counted once
        # Back to Berlin: the Tokyo window goes on in the Berlin one.
        (workdir / "policy.yaml").write_text(policy(
            url, name="alice-daily", tokens=30_000, extra=", renamed_from: user-daily"
        ))  # fmt: skip
        svc.send_signal(signal.SIGHUP)
        _reloaded(svc, 2)
        assert _remaining(client) == 30_000 - 2080


def test_an_audit_only_budget_never_refuses_and_says_it_would_have(
    client: openai.OpenAI, authz_port: int, workdir: Path, url: str, redis_server: RedisServer,
    fake_llm: FakeLLMThread,
) -> None:  # fmt: skip
    with _start(workdir, authz_port, policy(url)) as svc:
        _spend(client, svc, 1)  # 1,040 of research-watch's 1,500
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", max_tokens=1000, messages=HI,  # type: ignore[arg-type]
            extra_headers={"x-fake-prompt-tokens": "40", "x-fake-words": "1000"},
        )  # fmt: skip
        assert raw.parse().choices[0].message.content
        warning = raw.headers["x-authz-budget-warning"]
        assert warning.startswith("audit-only budget 'research-watch' for "
                                  "org:acme/department:research would have refused")  # fmt: skip
        # The enforced budget's headers are untouched by it.
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 20_000 - 1040 - 1005
        _settled(svc, 2)
        assert _remaining(client) == 20_000 - 2080
    # Counted all the same: 2,080 of 1,500 in its counter.
    pol = load_policy(workdir / "policy.yaml")
    assert asyncio.run(_used(redis_server.url, pol, "research-watch")) == 2080


def test_rollover_opens_the_day_with_yesterdays_unused_part(
    client: openai.OpenAI, authz_port: int, workdir: Path, url: str, redis_server: RedisServer,
    fake_llm: FakeLLMThread,
) -> None:  # fmt: skip
    text = policy(url, extra=", rollover: {max: 25%}")
    (workdir / "policy.yaml").write_text(text)
    pol = load_policy(workdir / "policy.yaml")
    _, _, yesterday = PeriodWindows(pol.timezone).get_with_previous("day", time.time())
    # Yesterday (in the policy's timezone) alice used 2,000 of 20,000: 18,000 unused,
    # of which 25% of the amount (5,000) carries over.
    asyncio.run(_spend_at(redis_server.url, pol, yesterday + 60, 2000))
    with _start(workdir, authz_port, text) as svc:
        assert _remaining(client) == 20_000 + 5000
        # Past the nominal amount on the credit: 40 + 21,000 fits 25,000 (not 20,000).
        client.chat.completions.create(
            model="gpt-4o", max_tokens=21_000, messages=HI,  # type: ignore[arg-type]
            extra_headers={"x-fake-prompt-tokens": "40", "x-fake-words": "100"},
        )  # fmt: skip
        _settled(svc, 1)
        assert _remaining(client) == 25_000 - 140


def _limits(pol: Policy, now: float) -> tuple[Limit, ...]:
    return tuple(p.limit for p in plan_limits(pol, ALICE, "gpt-4o", PeriodWindows(pol.timezone),
                                              now))  # fmt: skip


async def _spend_at(url: str, pol: Policy, at: float, tokens: int) -> None:
    ledger = open_ledger(url + "?lease=off", FakeClock(at))
    try:
        out = await ledger.reserve(f"{'0' * 32}@acme", _limits(pol, at), TokenUsage(tokens, 0, 0),
                                   deadline=at + 60, expiry_charge=TokenUsage(0, 0, 0))  # fmt: skip
        assert isinstance(out, Reservation)
        assert (await ledger.settle(out.id, TokenUsage(tokens, 0, 0))).settled
    finally:
        await ledger.close()


async def _used(url: str, pol: Policy, budget: str) -> int:
    now = time.time()
    (limit,) = [lim for lim in _limits(pol, now) if lim.budget == budget]
    ledger = open_ledger(url + "?lease=off", FakeClock(now))
    try:
        bal = await ledger.balance(limit)
    finally:
        await ledger.close()
    return bal.used + bal.reserved
