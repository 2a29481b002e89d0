"""A memo that forgets what was not asked for lately: memory bounded by activity.

The hot path memoises per caller (the subject path of a token's claims, the limits of a
path, the budgets of a path). A plain dict would keep every caller ever seen; one
cleared at a size cap keeps up to the cap for good, however long the callers have been
gone (issue 9, #7: 100k users once each kept 167 MB). :class:`Recent` keeps two
generations instead: lookups read the young one, then the old one (moving a hit to the
young one), and :meth:`rotate` drops the old generation and makes the young one old.
Rotating every ``T`` seconds (the server's sweep, see ``Enforcer.forget_idle``) keeps
exactly what was used in the last ``T`` to ``2T`` seconds, at O(1) per lookup and with
no scan; a full young generation rotates early, so at most ``2 * max_entries`` stay.

Dropping a generation drops its dict whole, so its hash table is freed too (a dict
never shrinks its table when keys are deleted one by one).

Callers seen once are not worth keeping at all (:meth:`Recent.offer`, :class:`Doorkeeper`,
the "doorkeeper" of TinyLFU caches): a memo entry is kept only for a key offered before
in the last one or two rotations. Freeing is not enough to give memory back: CPython's
allocator returns a 1 MiB arena only once every object in it is gone, and a few
long-lived objects made during a burst of new callers (a counter's new value, a memo
key) pin the arenas their memos filled. 200k callers once each (``python -m bench
memory --idle``) kept +20-28% RSS after they left; entries that never come into being
pin nothing. A caller who comes back pays the uncached work once more, on its second
request; from then on it is memoised as before.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Doorkeeper", "Recent"]

K = TypeVar("K")
V = TypeVar("V")


# Bits per doorkeeper generation: 128 KiB each, allocated once. At 50k new keys per
# rotation, ~5% of first sightings pass as second ones: they are only memoised early.
DOOR_BITS = 1 << 20


class Doorkeeper:
    """Which keys were offered in the last one or two rotations, in two fixed bit arrays.

    No object is kept per key (a key's hash sets one bit), so a burst of new keys costs
    no memory; a hash collision only lets a first-time key through.
    """

    __slots__ = ("_mask", "_old", "_turned_away", "_young")

    def __init__(self, bits: int = DOOR_BITS) -> None:
        if bits <= 0 or bits & (bits - 1):
            raise ValueError(f"doorkeeper bits must be a power of two (got {bits})")
        self._young = bytearray(max(1, bits >> 3))
        self._old = bytearray(max(1, bits >> 3))
        self._mask = bits - 1
        self._turned_away = 0

    def admit(self, key: Hashable) -> bool:
        """True if ``key`` was offered before (since the last-but-one rotation); either
        way it counts as offered now."""
        h = hash(key) & self._mask
        byte, bit = h >> 3, 1 << (h & 7)
        if self._young[byte] & bit:
            return True
        self._young[byte] |= bit
        if self._old[byte] & bit:
            return True
        self._turned_away += 1
        return False

    def rotate(self) -> int:
        """Forget the keys not offered since the last rotation. Returns how many were
        turned away since the last one: entries that were never made, which count as
        forgotten when deciding to give memory back (authz.reclaim)."""
        self._old, self._young = self._young, self._old
        self._young[:] = bytes(len(self._young))
        turned_away, self._turned_away = self._turned_away, 0
        return turned_away


class Recent(Generic[K, V]):
    __slots__ = ("_door", "_max", "_old", "_young")

    def __init__(self, max_entries: int = 100_000) -> None:
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}
        self._max = max_entries
        self._door: Doorkeeper | None = None  # made by the first offer()

    def get(self, key: K) -> V | None:
        hit = self._young.get(key)
        if hit is not None or not self._old:
            return hit
        hit = self._old.pop(key, None)
        if hit is not None:
            self[key] = hit
        return hit

    def __setitem__(self, key: K, value: V) -> None:
        if len(self._young) >= self._max:
            self.rotate()
        self._young[key] = value

    def offer(self, key: K, value: V, seen: Hashable = None) -> bool:
        """Keep ``key -> value`` only if ``seen`` (the key itself by default) was offered
        before in the last one or two rotations; True if kept. For memos of callers, of
        which many come once and never again."""
        if self._door is None:
            self._door = Doorkeeper()
        if not self._door.admit(key if seen is None else seen):
            return False
        self[key] = value
        return True

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def rotate(self) -> int:
        """Forget everything not used since the last rotation; return how many (with
        the offers turned away since the last rotation)."""
        dropped = len(self._old)
        self._old, self._young = self._young, {}
        if self._door is not None:
            dropped += self._door.rotate()
        return dropped

    def clear(self) -> None:
        self._young, self._old = {}, {}
