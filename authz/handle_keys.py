"""Where the reservation-handle key comes from (see :mod:`authz.handles` for what it does).

Every replica that shares a ledger must hold the same key: Envoy may send a request's
Check to one replica and its ext_proc stream to another. In order of precedence:

1. ``--handle-key-file`` / ``AUTHZ_HANDLE_KEY_FILE`` (in Kubernetes, a Secret): at
   least 32 bytes, read once at start. Needed to keep handles valid across restarts
   of a single process on a persistent ledger, or to rotate the key by hand.
2. A Redis ledger: a random key created once in Redis (``SET NX``) and read by every
   replica at start, then re-read every ``REFRESH_S``. If Redis cannot be reached at
   start, the replica signs with a random key of its own (and says so) and adopts the
   shared key as soon as Redis answers; what it signed meanwhile still verifies on it.
3. The embedded sqlite ledger: a random key kept beside the database file
   (``<db>.handle-key``, mode 0600, created on first start). The ledger's state outlives
   a restart, so must the key: a stream that straddles a graceful restart then still
   settles at its real usage instead of its expiry charge.
4. Otherwise (``memory://``): a random key per process; its state dies with it anyway.

A handle no replica can verify any more (its process restarted on a per-process key,
or the key file changed) is refused at settle time like a forgery: its reservation
stays open until it expires and the sweep charges it per ``reservations.on_expiry``.
That is the safe outcome: never free, at worst the reserved estimate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

from authz.errors import AuthzError, LedgerUnavailable
from authz.handles import MIN_KEY_BYTES, HandleKeys, key_fingerprint

__all__ = ["ENV_KEY_FILE", "REFRESH_S", "open_handle_keys", "read_key_file"]

log = logging.getLogger("authz.handles")
ENV_KEY_FILE = "AUTHZ_HANDLE_KEY_FILE"
REFRESH_S = 30.0

Refresh = Callable[[], Awaitable[None]]


def read_key_file(path: str) -> bytes:
    """The key in ``path`` (surrounding whitespace dropped), or an :class:`AuthzError`."""
    try:
        with open(path, "rb") as f:
            key = f.read(1 << 16).strip()
    except OSError as exc:
        raise AuthzError(f"handle key file {path}: {exc.strerror or exc}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise AuthzError(
            f"handle key file {path}: needs at least {MIN_KEY_BYTES} bytes (got {len(key)});"
            " e.g. `head -c 32 /dev/urandom | base64 > FILE`"
        )
    return key


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "redis+cluster://"))


def _beside_db(ledger_url: str, state_dir: str) -> bytes:
    """The sqlite ledger's key, created beside its file on first use.

    Only the process holding the ledger's lock gets here (it is opened first), so two
    processes never race to create it."""
    from authz.ledger.sqlite import parse_sqlite_url

    path = str(parse_sqlite_url(ledger_url, state_dir).path) + ".handle-key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key_file(path)
    except OSError as exc:
        raise AuthzError(f"handle key file {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(MIN_KEY_BYTES).hex().encode())
        f.flush()
        os.fsync(f.fileno())
    return read_key_file(path)


async def open_handle_keys(
    key_file: str | None, ledger_url: str, state_dir: str = "."
) -> tuple[HandleKeys, Refresh | None]:
    """The keys to sign with, and a coroutine to call periodically (None: nothing to do)."""
    path = key_file or os.environ.get(ENV_KEY_FILE) or None
    if path:
        keys = HandleKeys(read_key_file(path), "file")
        _announce(keys)
        return keys, None
    if ledger_url.startswith("sqlite:"):
        keys = HandleKeys(_beside_db(ledger_url, state_dir), "ledger file")
        _announce(keys)
        return keys, None
    if not _is_redis(ledger_url):
        keys = HandleKeys.random("process")
        _announce(keys)
        return keys, None
    from authz.ledger.redis.handle_key import shared_handle_key

    keys = HandleKeys.random("process (until Redis answers)")

    async def refresh() -> bool:
        """True if the key changed (a first start on Redis, or a replacement)."""
        try:
            shared = await shared_handle_key(ledger_url, keys.key)
            was_shared = keys.source == "redis"
            return keys.adopt(shared, "redis") or not was_shared
        except (LedgerUnavailable, ValueError) as exc:
            if keys.source != "redis":  # still on the fallback: say so each time
                log.warning(
                    "handle key: Redis not usable yet, signing with this process's own key"
                    " (its settles on other replicas will be refused): %s",
                    exc,
                )
            return False

    async def periodic() -> None:
        if await refresh():
            _announce(keys)

    await refresh()
    _announce(keys)
    return keys, periodic


def _announce(keys: HandleKeys) -> None:
    log.info(
        "reservation handle key",
        extra={"source": keys.source, "fingerprint": key_fingerprint(keys.key)},
    )
