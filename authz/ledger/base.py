"""The ledger contract: what every quota store (memory, Redis, Redis Cluster) does.

Amounts are counted in *units*: tokens weighted per budget (see
:class:`authz.policy.model.Weights`). The ledger receives raw token counts and each
limit's weights, so settlement can re-weigh real usage without consulting the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from authz.policy.model import Weights
from authz.usage.types import TokenUsage

__all__ = ["Balance", "Ledger", "Limit", "Refusal", "Reservation", "SettleOutcome"]


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget counter for one node and one period window."""

    key: str  # unique per budget, node and window start
    budget: str  # the budget's name (named in denials)
    node: str  # the node's path, e.g. "org:acme/department:research"
    amount: int  # units allowed in the window
    window_end: float  # when the window resets (epoch seconds); the counter may go then
    weights: Weights


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    limits: tuple[Limit, ...]
    units: tuple[int, ...]  # reserved per limit
    remaining: tuple[int, ...]  # per limit, after this reservation
    deadline: float  # expires (and is charged per policy) if not settled by then


@dataclass(frozen=True, slots=True)
class Refusal:
    """The first limit on the path that cannot take the request (a value, not an error)."""

    limit: Limit
    requested: int  # units the request needed on that limit
    remaining: int  # units left there


@dataclass(frozen=True, slots=True)
class Balance:
    amount: int
    used: int  # settled
    reserved: int  # held by open reservations

    @property
    def remaining(self) -> int:
        return max(0, self.amount - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    settled: bool  # False: already settled (idempotent no-op) or unknown
    late: bool = False  # the reservation had expired; its charge was corrected


class Ledger(Protocol):
    """Quota state. Every method is safe under concurrency: reserve is all-or-nothing."""

    async def reserve(
        self,
        reservation_id: str,
        limits: tuple[Limit, ...],
        tokens: TokenUsage,
        *,
        deadline: float,
        expiry_charge: TokenUsage,
    ) -> Reservation | Refusal:
        """Hold ``tokens`` (weighted per limit) on every limit, or on none.

        On refusal the first limit that would overflow is returned. ``expiry_charge`` is
        what is charged if the reservation is never settled by ``deadline``.
        """
        ...

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        """Replace the reservation by the real usage. Idempotent: a second call counts 0."""
        ...

    async def expire(self, now: float) -> int:
        """Charge and drop reservations past their deadline; return how many."""
        ...

    async def balance(self, limit: Limit) -> Balance:
        """The state of one counter (zero if never used)."""
        ...

    async def close(self) -> None:
        """Release connections; flush anything pending."""
        ...
