"""The hostile suite: the service tried as an attacker in the mesh or a lying upstream.

Every test here is marked ``hostile`` (``pytest -m hostile`` runs them alone; the
default run includes them) as well as its tier (``unit``, ``integration``, ``e2e``).
Property-based tests use the ``hostile`` hypothesis profile: bounded example counts and
no per-example deadline (a busy CI machine must not turn slowness into failures).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "hostile",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("hostile")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/hostile/" in str(item.fspath):
            item.add_marker(pytest.mark.hostile)
