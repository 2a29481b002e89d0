"""What the directory did, for ``/metrics`` and ``/readyz``.

One object per enforcer, kept across policy reloads (a reload may make a new
:class:`~authz.directory.cache.Directory`), read at each scrape by
:meth:`authz.telemetry.metrics.Metrics.watch_directory`. Labels are bounded: the
outcome of a lookup, and what the cache answered.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CACHE_RESULTS", "LOOKUP_OUTCOMES", "DirectoryStats"]

LOOKUP_OUTCOMES = ("found", "not_found", "error", "timeout")
# hit / negative_hit: fresh; miss / expired: looked up; last_known / fallback / denied:
# what on_down gave while the directory could not answer.
CACHE_RESULTS = (
    "hit", "negative_hit", "miss", "expired", "last_known", "fallback", "denied",
)  # fmt: skip


@dataclass(slots=True)
class DirectoryStats:
    configured: bool = True
    up: bool = True
    last_error: str = ""
    entries: int = 0
    on_down_mode: str = "last_known"
    lookups: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)

    def lookup(self, outcome: str) -> None:
        self.lookups[outcome] += 1

    def cache(self, result: str) -> None:
        self.answers[result] += 1

    def went_down(self, why: str) -> None:
        self.up, self.last_error = False, why

    def came_up(self) -> None:
        self.up = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "on_down": self.on_down_mode,
            "last_error": self.last_error,
            "cached_subjects": self.entries,
        }
