"""Static API keys, held only as SHA-256 digests.

Lookup is a dict access on the digest of the presented key. That is not a timing leak
worth a constant-time scan: what a timing side channel could reveal is how much of a
*digest* matched, and finding an input whose SHA-256 shares a chosen prefix with a stored
digest tells nothing about the key that produced it (preimage resistance). A dict keeps
the check O(1) however many keys a deployment has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from authz.errors import IdentityError
from authz.identity.settings import ApiKeyEntry

__all__ = ["ApiKeyStore", "hash_api_key"]


def hash_api_key(key: str) -> str:
    """The lowercase hex SHA-256 of ``key``: the value to put in ``ApiKeyEntry.sha256``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyStore:
    """The configured API keys, found by the digest of the key a caller presents."""

    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        by_digest: dict[str, ApiKeyEntry] = {}
        names: set[str] = set()
        for entry in entries:
            # Two names for one key would make metrics and audit logs ambiguous about
            # who spent the budget; a repeated name would merge two callers' metrics.
            if entry.sha256 in by_digest:
                raise ValueError(
                    f"api keys {by_digest[entry.sha256].name!r} and {entry.name!r} "
                    "have the same sha256"
                )
            if entry.name in names:
                raise ValueError(f"api key name {entry.name!r} is used twice")
            by_digest[entry.sha256] = entry
            names.add(entry.name)
        self._by_digest = by_digest

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, key: str) -> ApiKeyEntry:
        """The entry for ``key``; ``IdentityError("unknown_api_key")`` if there is none.

        The message never contains the key: it ends up in logs and in the 401 body.
        """
        entry = self._by_digest.get(hash_api_key(key))
        if entry is None:
            raise IdentityError("unknown_api_key", "the API key is not recognised")
        return entry
