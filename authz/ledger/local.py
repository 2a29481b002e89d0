"""Requests admitted by this replica alone while the quota store is unreachable.

Each admission is held in memory under ``local:<reservation id>`` until it is settled
(its real usage then goes to the journal as a charge), expires (charged its expiry
amount, as the store would have done) or the process stops (same). A tally per limit
key counts what this replica has admitted since the breaker opened, the way a ledger
counts a counter: held units at admission, replaced by the real usage on settle. In
``local_allowance`` mode the tally is capped; the cap starts again from zero each time
the breaker closes (the store then knows everything that was spent).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from authz.ledger.base import Limit, Refusal, Reservation
from authz.usage.types import TokenUsage

__all__ = ["LOCAL_PREFIX", "Hold", "LocalAdmissions"]

LOCAL_PREFIX = "local:"


@dataclass(slots=True)
class Hold:
    id: str
    limits: tuple[Limit, ...]
    units: tuple[int, ...]
    deadline: float
    expiry_charge: TokenUsage
    room: int  # journal bytes promised for its charge


class LocalAdmissions:
    def __init__(self) -> None:
        self._holds: dict[str, Hold] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._tally: dict[str, int] = {}
        self.admitted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._holds)

    def check(
        self, limits: tuple[Limit, ...], tokens: TokenUsage, cap: int | None
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | Refusal:
        """(units, remaining) per limit if every limit can take ``tokens``, else a Refusal.

        ``cap`` None (fail_open) admits anything; remaining is then the budget's amount
        less what this replica admitted, an honest lower bound for the headers.
        """
        units = tuple(lim.units(tokens) for lim in limits)
        remaining = []
        for lim, u in zip(limits, units, strict=True):
            ceiling = lim.amount if cap is None else min(cap, lim.amount)
            left = ceiling - self._tally.get(lim.key, 0)
            if cap is not None and u > left and lim.enforce:  # audit only: never refused
                self.refused += 1
                return Refusal(lim, u, max(0, left))
            remaining.append(max(0, left - u))
        return units, tuple(remaining)

    def admit(
        self,
        rid: str,
        limits: tuple[Limit, ...],
        checked: tuple[tuple[int, ...], tuple[int, ...]],
        *,
        deadline: float,
        expiry_charge: TokenUsage,
        room: int,
    ) -> Reservation:
        units, remaining = checked
        local_id = rid if rid.startswith(LOCAL_PREFIX) else LOCAL_PREFIX + rid
        for lim, u in zip(limits, units, strict=True):
            self._tally[lim.key] = self._tally.get(lim.key, 0) + u
        self._holds[local_id] = Hold(local_id, limits, units, deadline, expiry_charge, room)
        heapq.heappush(self._deadlines, (deadline, local_id))
        self.admitted += 1
        return Reservation(local_id, limits, units, remaining, deadline)

    def settle(self, rid: str, actual: TokenUsage) -> Hold | None:
        """Take the hold ``rid`` (with or without its prefix) off; None if unknown."""
        hold = self._holds.pop(rid, None) or self._holds.pop(LOCAL_PREFIX + rid, None)
        if hold is not None:
            for lim, held in zip(hold.limits, hold.units, strict=True):
                if lim.key in self._tally:
                    self._tally[lim.key] = max(
                        0, self._tally[lim.key] - held + lim.settled_units(actual)
                    )
        return hold

    def confirm(self, rid: str, deadline: float, expiry_charge: TokenUsage) -> bool | None:
        """authz.confirm for a hold admitted here: True; None if ``rid`` is not a hold of
        this process (it may be the store's), False if it was a local id no longer held."""
        hold = self._holds.get(rid) or self._holds.get(LOCAL_PREFIX + rid)
        if hold is None:
            return False if rid.startswith(LOCAL_PREFIX) else None
        hold.expiry_charge = expiry_charge
        if deadline > hold.deadline:
            hold.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, hold.id))  # the old entry is stale
        return True

    def expired(self, now: float) -> list[Hold]:
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            hold = self._holds.get(rid)
            if hold is not None and hold.deadline <= now:
                out.append(hold)
                self.settle(rid, hold.expiry_charge)
        return out

    def drain(self) -> list[Hold]:
        """Every hold still open (the process is stopping)."""
        out = list(self._holds.values())
        self._holds.clear()
        self._deadlines.clear()
        return out

    def reset(self) -> None:
        """The breaker closed: the store counts from here; open holds stay until settled."""
        self._tally.clear()
