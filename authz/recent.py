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
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Recent"]

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    __slots__ = ("_max", "_old", "_young")

    def __init__(self, max_entries: int = 100_000) -> None:
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}
        self._max = max_entries

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

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def rotate(self) -> int:
        """Forget everything not used since the last rotation; return how many."""
        dropped = len(self._old)
        self._old, self._young = self._young, {}
        return dropped

    def clear(self) -> None:
        self._young, self._old = {}, {}
