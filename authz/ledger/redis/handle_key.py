"""The reservation-handle key shared through Redis by every replica of one ledger.

The first replica to ask stores a random key with ``SET NX``; every replica then reads
whichever key won, so all of them sign and verify alike (see :mod:`authz.handles`).
The key lives under ``<prefix>:handle-key`` with no expiry; anyone who can read the
ledger's Redis can read it, which is no new exposure: they can rewrite the budgets too.
"""

from __future__ import annotations

from authz.errors import LedgerUnavailable
from authz.ledger.redis.client import RedisClient
from authz.ledger.redis.config import parse_redis_url

__all__ = ["shared_handle_key"]


async def shared_handle_key(url: str, proposal: bytes) -> bytes:
    """The key every replica on ``url`` uses, storing ``proposal`` if there is none yet.

    Raises :class:`LedgerUnavailable` if Redis cannot be reached. A Redis that lost the
    key (restarted without persistence) gets ``proposal`` back from the next replica to
    ask, which passes the key it already holds.
    """
    opts = parse_redis_url(url)
    client = RedisClient(opts)
    name = f"{opts.prefix}:handle-key"
    try:
        await client.call("SET", name, proposal, "NX")
        value = await client.call("GET", name)
    finally:
        await client.close()
    if not isinstance(value, bytes):  # deleted between the two calls: try again later
        raise LedgerUnavailable(f"redis {name} vanished right after SET NX")
    return value
