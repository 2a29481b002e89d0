"""The ``env`` fixture: a fresh ledger of every backend in LEDGERS, with a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from authz.clock import FakeClock
from authz.ledger import Ledger
from tests.contract.backends import LEDGERS, UNIT


@pytest.fixture(
    params=[
        pytest.param(name, marks=pytest.mark.unit if name in UNIT else pytest.mark.integration)
        for name in sorted(LEDGERS)
    ]
)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Ledger, FakeClock]]:
    clock = FakeClock()
    ledger = LEDGERS[request.param](request, clock)
    yield ledger, clock
    await ledger.close()
