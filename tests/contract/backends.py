"""The ledger backends every contract test runs against, and small builders.

A new backend adds itself to LEDGERS; every test taking the ``env`` fixture
(tests/contract/conftest.py) then runs against it too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from authz.clock import FakeClock
from authz.ledger import Ledger, Limit, MemoryLedger, open_ledger
from authz.policy.model import Weights
from authz.usage.types import TokenUsage

__all__ = ["LEDGERS", "ONE", "UNIT", "Factory", "lim", "tok"]

Factory = Callable[[pytest.FixtureRequest, FakeClock], Ledger]


# The contract is about what a ledger answers, not how fast: a busy machine made 200
# concurrent calls miss the default 0.5 s call timeout ("unreachable") in stressed runs.
_PATIENT = "&timeout=10&connect_timeout=10"


def _redis(server_fixture: str, query: str) -> Factory:
    def make(request: pytest.FixtureRequest, clock: FakeClock) -> Ledger:
        url = request.getfixturevalue(server_fixture).url + query + _PATIENT
        return open_ledger(url, clock)

    return make


def _sqlite(request: pytest.FixtureRequest, clock: FakeClock) -> Ledger:
    tmp = request.getfixturevalue("tmp_path")
    return open_ledger("sqlite:///ledger.db", clock, state_dir=str(tmp))


LEDGERS: dict[str, Factory] = {
    "memory": lambda _, clock: MemoryLedger(clock),
    "sqlite": _sqlite,
    "redis": _redis("redis_server", "?lease=off"),
    "redis-leases": _redis("redis_server", "?lease=on&lease_flush_ms=10"),
    "cluster": _redis("redis_cluster", "?lease=off"),
    "cluster-leases": _redis("redis_cluster", "?lease=on&lease_flush_ms=10"),
}
UNIT = {"memory", "sqlite"}  # backends that need no server: the unit tier
ONE = Weights()


def lim(
    key: str, amount: int, clock: FakeClock, weights: Weights = ONE, window: float = 3600
) -> Limit:
    return Limit(key, key.split("|")[0], key, amount, clock.now() + window, weights)


def tok(i: int, o: int = 0, c: int = 0) -> TokenUsage:
    return TokenUsage(i, c, o)
