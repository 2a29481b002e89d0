"""Many distinct identities once each, then quiet: per-caller state goes (issue 9, #7).

Before, 100k users with one request each kept ~1.7 KB each for good: memos cleared only
at 100k entries, ledger counters pruned only when another reserve came, expired
reservations kept an hour. Here, with a fake clock, through the real enforcer and JWT
verifier: the memos do not grow with callers seen once, the ledger's counters do, and
once their windows have ended and the sweep has run (as authz.server does every
second), every structure is back to what it held before them. Counted in entries, not RSS (``python -m bench memory --idle``
measures RSS on the real service).
"""

from __future__ import annotations

import gc
import json
import types
from pathlib import Path
from typing import Any

import pytest

from authz.clock import FakeClock
from authz.decision import Verdict
from authz.enforcer import IDLE_S, CheckInput, Enforcer
from authz.ledger import Limit, MemoryLedger, Reservation
from authz.ledger.memory import STALE_DEADLINES
from authz.policy.model import Weights
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage
from tests.support.tokens import jwks_document, make_ec_key, mint

pytestmark = [pytest.mark.unit]

ISS, AUD = "https://idp.example.com/", "llm-gateway"
USERS = 1500


def _policy(tmp_path: Path) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_document(make_ec_key("mem"))))
    policy = {
        "version": 1,
        "timezone": "UTC",
        "identity": {"jwt": {"issuer": ISS, "audience": AUD, "algorithms": ["ES256"],
                             "jwks_file": "jwks.json"}},
        "subject": {"org": {"claim": "org_id"}, "department": {"claim": "department"},
                    "leaf": [{"level": "user", "claim": "sub"}]},
        "budgets": [{"name": "org-day", "match": {"org": "*"}, "tokens": 10**12,
                     "period": "day"},
                    {"name": "dept-day", "match": {"department": "*"}, "tokens": 10**12,
                     "period": "day"}],
        "rates": [{"name": "user-rpm", "match": {"user": "*"}, "requests_per_minute": 100}],
        "models": {"rules": [{"match": "gpt-*", "max_output_tokens": 10}]},
    }  # fmt: skip
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy))
    return path


def _check(token: str) -> CheckInput:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    return CheckInput(
        "POST", "/v1/chat/completions", {"authorization": f"Bearer {token}"}, body.encode()
    )


def _sizes(enforcer: Enforcer, ledger: MemoryLedger) -> dict[str, int]:
    """Entries in every per-caller structure (private fields: this test's whole point)."""
    jwt = enforcer._auth._jwt
    assert jwt is not None
    return {
        "subjects": len(enforcer._subjects),
        "plans": len(enforcer._planner),
        "budgets_for": len(enforcer.policy._cache),
        "rates_for": len(enforcer.policy._rate_cache),
        "tokens": len(jwt),
        "counters": len(ledger._counters),
        "open": len(ledger._open),
        "expired": len(ledger._expired),
        "deadlines": len(ledger._deadlines),
    }


async def _sweep_for(enforcer: Enforcer, clock: FakeClock, seconds: float) -> None:
    """What authz.server's sweep does, every (fake) second."""
    for _ in range(int(seconds)):
        clock.advance(1.0)
        await enforcer.expire_overdue()
        enforcer.forget_idle()


async def test_per_caller_state_shrinks_back_once_callers_are_idle(tmp_path: Path) -> None:
    clock = FakeClock(1_767_261_600.0)  # 2026-01-01 10:00 UTC: day windows stay open
    ledger = MemoryLedger(clock)
    enforcer = Enforcer(PolicyStore(_policy(tmp_path)), ledger, clock)
    key = make_ec_key("mem")

    def token(sub: str) -> str:
        claims: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": sub, "org_id": "acme",
                                  "department": "research", "exp": clock.now() + 86400}  # fmt: skip
        return mint(key, claims)

    regular = token("regular")

    async def one(tok: str, settle: bool = True) -> None:
        d = await enforcer.check(_check(tok))
        assert d.verdict is Verdict.ALLOW and d.reservation_id, d.message
        if settle:
            assert await enforcer.settle(d.reservation_id, TokenUsage(5, 0, 5))

    await one(regular)
    await _sweep_for(enforcer, clock, 3 * IDLE_S)
    await one(regular)
    await one(regular)  # a caller that comes back is memoised from its second check
    before = _sizes(enforcer, ledger)
    assert before["subjects"] == before["tokens"] == 1, before

    # Many users once each (a few never settle: their stream died), then one regular
    # caller keeps coming every few seconds while everyone else is gone.
    for i in range(USERS):
        await one(token(f"u{i}"), settle=i % 100 != 0)
        if i % 100 == 0:
            clock.advance(1.0)
    peak = _sizes(enforcer, ledger)
    # Callers seen once leave no memo (authz.recent.Doorkeeper: pymalloc arenas that
    # their entries filled stayed pinned after they left); their rate counters they do.
    memos = ("subjects", "plans", "budgets_for", "rates_for", "tokens")
    assert all(peak[name] <= before[name] + USERS // 100 for name in memos), (before, peak)
    assert peak["counters"] >= USERS, peak
    for _ in range(130):  # 1300 s: the reservation TTL (600 s) and late-settle memory (600 s)
        await one(regular)
        await _sweep_for(enforcer, clock, 10)
    after = _sizes(enforcer, ledger)
    # Every per-caller structure is back where it was; expired reservations of the
    # streams that died were kept for a late settle, then forgotten too.
    per_request = {"deadlines"}  # follows the request rate, not the callers
    assert {k: v for k, v in after.items() if k not in per_request} == {
        k: v for k, v in before.items() if k not in per_request
    }, (before, peak, after)
    assert after["deadlines"] <= 2 * after["open"] + STALE_DEADLINES  # compacted past that
    assert ledger.open_reservations == 0


async def test_an_idle_memory_ledger_forgets_on_the_sweep_alone() -> None:
    """No reserve after the load: the sweep's expire() still prunes windows and ids."""
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    for i in range(5000):
        lim = Limit(f"rpm|user:{i}|0", "rpm", f"user:{i}", 10, clock.now() + 60, Weights())
        out = await ledger.reserve(
            f"r{i}", (lim,), TokenUsage(1, 0, 1), deadline=clock.now() + 600,
            expiry_charge=TokenUsage(1, 0, 0),
        )  # fmt: skip
        assert isinstance(out, Reservation)
        if i % 2:
            await ledger.settle(f"r{i}", TokenUsage(1, 0, 1))
    for _ in range(1300):  # past the TTL (600 s) and the late-settle memory (600 s)
        clock.advance(1.0)
        await ledger.expire(clock.now())
    assert (len(ledger._counters), len(ledger._expired)) == (0, 0)
    assert ledger.open_reservations == 0 and len(ledger._deadlines) <= 1


async def test_a_late_settle_is_honoured_for_600_s_after_expiry() -> None:
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    lim = Limit("b|org:a|0", "b", "org:a", 1000, clock.now() + 86400, Weights())
    for rid in ("early", "late"):
        await ledger.reserve(
            rid, (lim,), TokenUsage(10, 0, 90), deadline=clock.now() + 600,
            expiry_charge=TokenUsage(10, 0, 0),
        )  # fmt: skip
    clock.advance(601)
    assert await ledger.expire(clock.now()) == 2
    clock.advance(590)
    assert (await ledger.settle("early", TokenUsage(20, 0, 30))).late
    clock.advance(20)
    await ledger.expire(clock.now())
    assert not (await ledger.settle("late", TokenUsage(20, 0, 30))).settled
    assert (await ledger.balance(lim)).used == 50 + 10  # early: real usage; late: expiry


async def test_alert_engine_keeps_nothing_per_refused_user(tmp_path: Path) -> None:
    """Alerts watch org/department/team by default: a user refused for its own budget
    left a (budget, node) entry in the engine that nothing ever read."""
    from authz.alerts import AlertEngine
    from authz.telemetry.metrics import Metrics

    clock = FakeClock(1_767_261_600.0)
    ledger = MemoryLedger(clock)
    path = _policy(tmp_path)
    doc = json.loads(path.read_text())
    doc["budgets"].append({"name": "user-day", "match": {"user": "*"}, "tokens": 5,
                           "period": "day"})  # fmt: skip
    path.write_text(json.dumps(doc))
    store = PolicyStore(path)
    engine = AlertEngine(lambda: store.current, ledger, clock, Metrics())
    enforcer = Enforcer(store, ledger, clock, observer=engine)
    key = make_ec_key("mem")
    for i in range(50):
        claims = {"iss": ISS, "aud": AUD, "sub": f"r{i}", "org_id": "acme",
                  "department": "research", "exp": clock.now() + 86400}  # fmt: skip
        d = await enforcer.check(_check(mint(key, claims)))
        assert d.verdict is Verdict.DENY and d.quota is not None, d.message
    assert len(engine._refused) == 50
    await engine.tick()
    assert not engine._refused


def _graph(*roots: object) -> dict[int, type]:
    """Every object reachable from ``roots`` (id -> type), leaving out code and modules:
    what the service itself keeps alive."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.CodeType, types.MethodType)  # fmt: skip
    seen: dict[int, type] = {}
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen[id(obj)] = type(obj)
        todo.extend(gc.get_referents(obj))
    return seen


async def test_nothing_made_for_a_burst_of_callers_outlives_it(tmp_path: Path) -> None:
    """Entries forgotten is not memory returned: CPython frees a 1 MiB arena only when
    every object in it is gone, so the few objects of a burst that are still alive after
    it pin the arenas it filled (``python -m bench memory --idle``: RSS +17% after 200k
    callers and an idle). The deadline heap kept the entries of up to 1,024 settled
    reservations (a tuple, its id, its deadline) until the next rebuild, which an idle
    ledger never reached. Counted here: objects the enforcer and ledger hold after the
    idle that they held at the end of the burst but not before it."""
    clock = FakeClock(1_767_261_600.0)
    ledger = MemoryLedger(clock)
    enforcer = Enforcer(PolicyStore(_policy(tmp_path)), ledger, clock)
    key = make_ec_key("mem")

    def token(sub: str) -> str:
        claims: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": sub, "org_id": "acme",
                                  "department": "research", "exp": clock.now() + 86400}  # fmt: skip
        return mint(key, claims)

    regular = token("regular")

    async def one(tok: str, settle: bool = True) -> None:
        d = await enforcer.check(_check(tok))
        assert d.verdict is Verdict.ALLOW and d.reservation_id, d.message
        if settle:
            assert await enforcer.settle(d.reservation_id, TokenUsage(5, 0, 5))

    for _ in range(3):
        await one(regular)
        await _sweep_for(enforcer, clock, IDLE_S)
    before = _graph(enforcer, ledger)
    for i in range(USERS):
        await one(token(f"u{i}"))
        if i % 50 == 0:
            clock.advance(1.0)
            await enforcer.expire_overdue()  # the server's sweep, every second
            enforcer.forget_idle()
    peak = _graph(enforcer, ledger)
    # Then quiet (no caller at all: objects made now could take the address of one of
    # the burst's, and be counted as a survivor) for four minutes, as the bench waits:
    # two memo rotations, less than the reservation TTL (600 s), so what is dropped
    # only at a reservation's deadline would still be there. Every burst reservation
    # was settled: nothing of it is needed any more.
    await _sweep_for(enforcer, clock, 4 * IDLE_S)
    after = _graph(enforcer, ledger)
    survivors = [
        t.__name__ for i, t in after.items() if peak.get(i) is t and before.get(i) is not t
    ]
    # The org's and department's counter values, made in the burst and still current, and
    # a few timestamps may (9); nothing per one-off caller or per request (1,355 before).
    assert len(survivors) <= 20, sorted(survivors)
