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

__all__ = [
    "Balance",
    "Ledger",
    "Limit",
    "Refusal",
    "Reservation",
    "SettleOutcome",
    "opening",
]


@dataclass(frozen=True, slots=True)
class Limit:
    """One counter for one node and one window: a period budget, a rate or a concurrency cap.

    A request holds ``units(tokens)`` at reserve; settling replaces the hold by
    ``settled_units(actual)``. Rates are limits too: requests-per-minute has zero weights
    and ``per_request=1``; a concurrency cap also gives its unit back on settle
    (``release_on_settle``), so only open reservations count.
    """

    key: str  # unique per budget, node and window start
    budget: str  # the budget's (or rate's) name, named in denials
    node: str  # the node's path, e.g. "org:acme/department:research"
    amount: int  # units allowed in the window: the hard ceiling (soft grace, burst included)
    window_end: float  # when the window resets (epoch seconds); the counter may go then
    weights: Weights
    per_request: int = 0  # units charged per request on top of the weighted tokens
    release_on_settle: bool = False  # concurrency: settled requests leave no usage behind
    carry_from: str | None = None  # burst payback: the previous window's counter key ...
    nominal: int = 0  # ... and its nominal amount: the next window starts with the overdraft
    rollover: int = 0  # ... or with the unused part of the nominal amount, up to this
    # A new counter opens with what this counter (the same budget's window under its old
    # name or timezone, after a policy edit) spent and holds: edits keep what was spent.
    inherit: str | None = None
    enforce: bool = True  # False (audit only): counted, never refused

    def units(self, tokens: TokenUsage) -> int:
        return self.weights.units(tokens) + self.per_request

    def settled_units(self, actual: TokenUsage) -> int:
        return 0 if self.release_on_settle else self.units(actual)


def opening(carry: int, rollover: int) -> int:
    """The used units a window opens with, from ``carry``: the last window's used units
    minus its nominal amount. An overdraft is paid back (burst); an unused part is
    credited (negative used), up to ``rollover``. The same sum in lib.lua."""
    return max(0, carry) - min(rollover, max(0, -carry))


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
    # Set when the refusal is temporary: a replica's local allowance, used up while the
    # store is unreachable (authz.ledger.breaker). Retry after this, not at window_end.
    retry_after_s: float | None = None


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
        model: str = "",
    ) -> Reservation | Refusal:
        """Hold ``tokens`` (weighted per limit) on every limit, or on none.

        ``model`` is a bounded label (the policy's model rule) kept with the reservation
        for usage rollups; it never changes the decision.

        On refusal the first limit that would overflow is returned. ``expiry_charge`` is
        what is charged if the reservation is never settled by ``deadline``.
        """
        ...

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        """Replace the reservation by the real usage. Idempotent: a second call counts 0."""
        ...

    async def confirm(self, reservation_id: str, deadline: float, charge: TokenUsage) -> bool:
        """The gateway used the Check's answer (:mod:`authz.confirm`): the open
        reservation now lives until ``deadline`` (never shortened) and is charged
        ``charge`` if it expires. False if not open (settled, expired, unknown) or if
        this ledger does not confirm (its ``confirms`` attribute is False)."""
        ...

    async def expire(self, now: float) -> int:
        """Charge and drop reservations past their deadline; return how many."""
        ...

    async def balance(self, limit: Limit) -> Balance:
        """The state of one counter (zero if never used)."""
        ...

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        """Add ``actual`` (weighted per limit, as a settle would) to every limit, once.

        No reservation is involved and nothing is refused: this is usage that already
        happened (a request admitted while the store was unreachable, replayed from the
        journal). True the first time; False for a ``charge_id`` already charged, which
        the ledger remembers at least as long as it remembers settled reservation ids.
        """
        ...

    async def close(self) -> None:
        """Release connections; flush anything pending."""
        ...
