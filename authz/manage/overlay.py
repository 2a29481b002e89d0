"""The allocations in force, applied to the enforcer's plan on every check.

The enforcer asks two things (authz/enforcer.py): is the caller's path frozen, and
what is each counter's amount once allocations are added. Both are dict lookups on a
snapshot; with no allocation the plan is returned as it is. The snapshot follows the
store: :meth:`Overlay.follow` polls the store's version every ``poll_s`` (a single
GET on Redis) and reloads the set only when it moved, so a change made on one replica
is in force on every other within ``poll_s`` plus one round trip (docs/management-api.md
has the measured figure). A store that cannot be read keeps the last snapshot: an
outage of the management data must not change budgets back and forth.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import replace

from authz.admission import PlannedLimit
from authz.manage.model import Allocation
from authz.manage.store import AllocationStore
from authz.policy.model import SubjectPath

__all__ = ["Overlay"]

log = logging.getLogger("authz.manage")


class Overlay:
    def __init__(self, store: AllocationStore, poll_s: float = 0.2) -> None:
        self.store = store
        self.poll_s = poll_s
        self.allocations: tuple[Allocation, ...] = ()
        self._version: str | None = None
        self._deltas: dict[tuple[str, str], list[Allocation]] = {}
        self._freezes: dict[str, list[Allocation]] = {}
        self._failing = False

    def use(self, allocations: tuple[Allocation, ...]) -> None:
        """Take a new snapshot (the poller's, or a test's)."""
        deltas: dict[tuple[str, str], list[Allocation]] = defaultdict(list)
        freezes: dict[str, list[Allocation]] = defaultdict(list)
        for a in allocations:
            if a.kind == "freeze":
                freezes[a.node].append(a)
            elif a.budget is not None:
                deltas[(a.budget, a.node)].append(a)
        self.allocations = allocations
        self._deltas, self._freezes = dict(deltas), dict(freezes)

    async def refresh(self) -> bool:
        """Reload from the store if its version moved; True if the snapshot changed."""
        version = await self.store.version()
        if version == self._version:
            return False
        self.use(await self.store.all())
        self._version = version
        return True

    async def follow(self) -> None:
        """Poll the store until cancelled (a task of the server)."""
        while True:
            try:
                await self.refresh()
                if self._failing:
                    log.info("allocation store reachable again")
                self._failing = False
            except Exception as exc:  # kept: the last snapshot stays in force
                if not self._failing:
                    log.error("allocation store unreadable; keeping the last allocations: %s",
                              exc)  # fmt: skip
                self._failing = True
            await asyncio.sleep(self.poll_s)

    # -- what the enforcer asks ---------------------------------------------------
    def frozen(self, subject: SubjectPath, now: float) -> Allocation | None:
        """The active freeze on the subject's path (its own node or any above), if any."""
        if not self._freezes:
            return None
        key = ""
        for node in subject.nodes:
            key = f"{key}/{node.level}:{node.name}" if key else f"{node.level}:{node.name}"
            for a in self._freezes.get(key, ()):
                if a.active(now):
                    return a
        return None

    def delta(self, budget: str, node: str, now: float) -> int:
        return sum(a.tokens for a in self._deltas.get((budget, node), ()) if a.active(now))

    def apply(self, plan: tuple[PlannedLimit, ...], now: float) -> tuple[PlannedLimit, ...]:
        """The plan with each budget counter's amount moved by its active allocations."""
        if not self._deltas:
            return plan
        out = []
        for p in plan:
            if p.budget is not None and not p.rate:
                d = self.delta(p.limit.budget, p.limit.node, now)
                if d:
                    p = replace(p, limit=replace(p.limit, amount=max(0, p.limit.amount + d)))
            out.append(p)
        return tuple(out)
