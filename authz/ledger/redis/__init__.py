"""The Redis and Redis Cluster ledger: keys (keys.py), URL options (config.py), the
connection and scripts (client.py, ``*.lua``), and the ledger itself (ledger.py).

Kept import-light: the policy loader validates URLs with :func:`parse_redis_url`
without loading redis-py; import :class:`authz.ledger.redis.ledger.RedisLedger` to use it.
"""

from __future__ import annotations

from authz.ledger.redis.config import SCHEMES, LeaseOptions, RedisOptions, parse_redis_url

__all__ = ["SCHEMES", "LeaseOptions", "RedisOptions", "parse_redis_url"]
