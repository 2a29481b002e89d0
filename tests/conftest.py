"""Suite-wide fixtures: the real Redis servers (see tests/support/redis_proc.py), and
SDK clients closed at the end of each test (tests/support/clients.py)."""

from collections.abc import Iterator

import pytest

from tests.support.clients import close_all
from tests.support.redis_proc import (  # noqa: F401  (fixtures, found by name)
    redis_cluster,
    redis_cluster_session,
    redis_server,
    redis_server_session,
)


@pytest.fixture(autouse=True)
def close_sdk_clients() -> Iterator[None]:
    yield
    close_all()
