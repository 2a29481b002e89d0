"""Tentative holds in the enforcer and the breaker (authz.confirm), on a fake clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.enforcer import Enforcer
from authz.ledger import MemoryLedger
from authz.ledger.local import LocalAdmissions
from authz.policy.store import PolicyStore
from authz.usage.types import TokenUsage
from tests.contract.backends import lim as make_limit
from tests.unit.test_enforcer import _policy, chat, req

pytestmark = pytest.mark.unit


def _enforcer(tmp_path: Path, extra: str = "") -> tuple[Enforcer, MemoryLedger, FakeClock]:
    clock = FakeClock(1_700_000_000.0)
    ledger = MemoryLedger(clock)
    return Enforcer(PolicyStore(_policy(tmp_path, extra)), ledger, clock), ledger, clock


def _envoy(key: str) -> object:
    return dataclasses.replace(req(key, chat(max_tokens=10)), confirmed_later=True)


async def test_holds_are_full_until_the_gateway_is_seen_confirming(tmp_path: Path) -> None:
    # A gateway without ext_proc never confirms: its holds must not be released at 0.
    enf, ledger, clock = _enforcer(tmp_path)
    first = await enf.check(_envoy("k-alice"))  # type: ignore[arg-type]
    assert first.reservation_id is not None
    clock.advance(11)
    assert await ledger.expire(clock.now()) == 0  # a full hold: ttl_s (600 s)
    assert await enf.confirm(first.reservation_id, 20, 10)
    assert enf.gateway_confirms


async def test_unconfirmed_answer_released_at_zero_confirmed_kept(tmp_path: Path) -> None:
    enf, ledger, clock = _enforcer(tmp_path)
    enf.gateway_confirms = True
    used = await enf.check(_envoy("k-alice"))  # type: ignore[arg-type]
    dropped = await enf.check(_envoy("k-bob"))  # type: ignore[arg-type]
    assert used.reservation_id and dropped.reservation_id
    assert await enf.confirm(used.reservation_id, used.input_estimate, used.output_reserved)
    clock.advance(11)  # past confirm_s (10 s)
    assert await ledger.expire(clock.now()) == 1  # only the unconfirmed one
    assert ledger.open_reservations == 1
    # The dropped one cost nothing; the used one is still held.
    assert not await enf.confirm(dropped.reservation_id, 1, 1)  # released already
    clock.advance(600)
    assert await ledger.expire(clock.now()) == 1  # the confirmed hold, charged on_expiry


async def test_checks_that_no_stream_follows_keep_full_holds(tmp_path: Path) -> None:
    # Kong and other gateways settle over HTTP without an ext_proc stream.
    enf, ledger, clock = _enforcer(tmp_path)
    enf.gateway_confirms = True
    plain = await enf.check(req("k-alice", chat(max_tokens=10)))
    assert plain.reservation_id is not None
    clock.advance(11)
    assert await ledger.expire(clock.now()) == 0


async def test_confirm_s_zero_turns_it_off(tmp_path: Path) -> None:
    enf, ledger, clock = _enforcer(tmp_path, "reservations: {confirm_s: 0}")
    enf.gateway_confirms = True
    d = await enf.check(_envoy("k-alice"))  # type: ignore[arg-type]
    clock.advance(11)
    assert await ledger.expire(clock.now()) == 0
    assert d.reservation_id and not await enf.confirm(d.reservation_id, 1, 1)


def test_confirm_s_is_validated(tmp_path: Path) -> None:
    path = _policy(tmp_path, "reservations: {confirm_s: -1}")
    with pytest.raises(Exception, match=r"reservations\.confirm_s"):
        PolicyStore(path)


def test_local_holds_confirm_in_place() -> None:
    clock = FakeClock(100.0)
    local = LocalAdmissions()
    lim = make_limit("org|a", 1000, clock)  # type: ignore[arg-type]
    checked = local.check((lim,), TokenUsage(10, 0, 5), None)
    assert not hasattr(checked, "limit")
    local.admit("r1", (lim,), checked, deadline=110.0, expiry_charge=TokenUsage(0, 0, 0),  # type: ignore[arg-type]
                room=1)  # fmt: skip
    assert local.confirm("local:r1", 700.0, TokenUsage(10, 0, 0)) is True
    assert local.confirm("elsewhere", 700.0, TokenUsage(10, 0, 0)) is None  # the store's
    assert local.expired(111.0) == []  # the stale short deadline is skipped
    [hold] = local.expired(701.0)
    assert hold.expiry_charge == TokenUsage(10, 0, 0)
    assert local.confirm("local:r1", 800.0, TokenUsage(10, 0, 0)) is False


def test_http_check_port_checks_keep_full_holds() -> None:
    # Built as the HTTP check port builds it (Kong: no ext_proc stream will confirm).
    from authz.envoy.convert import check_input
    from authz.httpcheck.check import check_request

    http = check_request("POST", "/v1/chat/completions", [("authorization", "Bearer k")], b"{}")
    assert check_input(http, "payload").confirmed_later is False
    http.attributes.context_extensions.clear()  # as Envoy's gRPC ext_authz sends it
    assert check_input(http, "payload").confirmed_later is True

