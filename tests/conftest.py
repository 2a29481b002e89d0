"""Suite-wide fixtures: the real Redis servers (see tests/support/redis_proc.py)."""

from tests.support.redis_proc import (  # noqa: F401  (fixtures, found by name)
    redis_cluster,
    redis_cluster_session,
    redis_server,
    redis_server_session,
)
