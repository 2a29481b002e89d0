"""The hostile suite: the service tried as an attacker in the mesh or a lying upstream.

Every test here is marked ``hostile`` (``pytest -m hostile`` runs them alone; the
default run includes them) as well as its tier (``unit``, ``integration``, ``e2e``).
Property-based tests use the ``hostile`` hypothesis profile: bounded example counts and
no per-example deadline (a busy CI machine must not turn slowness into failures).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# The e2e fixtures (fake upstream, the real Envoy on the shipped envoy.yaml, the port its
# authz cluster targets), shared with tests/e2e rather than copied. Only tests that
# name them start anything. Session-scoped ones are this directory's own instances.
from tests.e2e.conftest import (  # noqa: F401  (fixtures, found by name)
    authz_port,
    envoy,
    envoy_mutate,
    fake_llm,
    fake_llm_server,
)

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
