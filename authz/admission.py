"""Admission control: which counters a request must fit, and the queue for rate waits.

:func:`plan_limits` turns a subject's budgets and rates into ledger limits. Period
budgets come first and rates last, so a rate refusal from the (all-or-nothing, in
order) ledger means every budget had room: only then may the check wait in the
:class:`AdmissionQueue` instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from authz.ledger.base import Limit
from authz.policy.model import Budget, Policy, SubjectPath, Weights
from authz.policy.periods import PeriodWindows
from authz.recent import Recent

__all__ = [
    "AdmissionQueue",
    "LimitPlanner",
    "PlannedLimit",
    "QueueFull",
    "budget_limit",
    "plan_limits",
]

T = TypeVar("T")
_COUNT = Weights(0.0, 0.0, 0.0)  # requests and concurrency count requests, not tokens
_RAW = Weights(1.0, 1.0, 1.0)  # tokens-per-minute counts every token once


@dataclass(frozen=True, slots=True)
class PlannedLimit:
    limit: Limit
    rate: bool  # True: may wait for it; False: a period budget, deny at once
    budget: Budget | None = None  # for soft/burst warnings


class Unpriced(Exception):
    """A cost budget applies but the model has no price (and unpriced models are denied)."""


def plan_limits(
    policy: Policy, subject: SubjectPath, model: str | None, windows: PeriodWindows, now: float
) -> tuple[PlannedLimit, ...]:
    planned: list[PlannedLimit] = []
    for b in policy.budgets_for(subject):
        node = subject.prefix_key(b.level)
        if node is None:
            continue  # a level not on this path, or a group budget (authz.groups)
        limit = budget_limit(policy, b, node, model, windows, now)
        planned.append(PlannedLimit(limit, False, b))
    for r in policy.rates_for(subject):
        node = subject.prefix_key(r.level)
        if node is None:
            continue
        if r.kind == "concurrent":
            # No window: the counter lives while reservations hold it (the end is only
            # for garbage collection of an idle counter).
            end = now + policy.reservations.ttl_s + 60
            limit = Limit(f"{r.name}|{node}|c", r.name, node, r.amount, end, _COUNT,
                          per_request=1, release_on_settle=True)  # fmt: skip
        else:
            start, end = windows.get("minute", now)
            weights, per_request = (_RAW, 0) if r.kind == "tokens_per_minute" else (_COUNT, 1)
            limit = Limit(f"{r.name}|{node}|{int(start)}", r.name, node, r.amount, end, weights,
                          per_request=per_request)  # fmt: skip
        planned.append(PlannedLimit(limit, True))
    return tuple(planned)


def budget_limit(policy: Policy, b: Budget, node: str, model: str | None,
                 windows: PeriodWindows, now: float) -> Limit:  # fmt: skip
    """The ledger limit of budget ``b`` counted on ``node`` in the window of ``now``."""
    start, end, prev = windows.get_with_previous(b.period, now)
    weights = b.weights
    if b.unit == "cost":
        price = policy.pricing.for_model(model)
        if price is None:
            raise Unpriced(model or "")
        weights = price.weights()
    carries = bool(b.burst or b.rollover)
    carry = f"{b.name}|{node}|{int(prev)}" if carries else None
    return Limit(
        f"{b.name}|{node}|{int(start)}", b.name, node, b.tokens + b.soft_grace + b.burst,
        end, weights, carry_from=carry, nominal=b.tokens if carries else 0,
        rollover=b.rollover, inherit=inherited(b, node, start, windows), enforce=b.enforce,
    )  # fmt: skip


def inherited(b: Budget, node: str, start: float, windows: PeriodWindows) -> str | None:
    """The counter a budget's window continues after an edit (issue 16): the same window
    under the name it had (``renamed_from``), or the old timezone's window of the moment
    a reload changed the timezone. None when the key did not change."""
    old_start = windows.replaced_start(b.period, start)
    if b.renamed_from is None and old_start is None:
        return None
    name = b.renamed_from or b.name
    return f"{name}|{node}|{int(start if old_start is None else old_start)}"


class LimitPlanner:
    """Caches each subject's plan until its first window ends (or the policy changes).

    The plan depends on the path, the policy, the current windows and, for cost budgets,
    the model's price; the hot path would otherwise rebuild the same limits per check.
    Plans of subjects not seen lately go at each :meth:`forget_idle` (:class:`Recent`).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        Plan = tuple[float, tuple[PlannedLimit, ...]]  # valid until, the limits
        self._cache: Recent[tuple[object, ...], Plan] = Recent(max_entries)
        self._policy: Policy | None = None

    def forget_idle(self) -> int:
        """Drop the plans not asked for since the last call; return how many."""
        return self._cache.rotate()

    def __len__(self) -> int:
        return len(self._cache)

    def plan(self, policy: Policy, subject: SubjectPath, model: str | None,
             windows: PeriodWindows, now: float) -> tuple[PlannedLimit, ...]:  # fmt: skip
        if policy is not self._policy:
            self._cache.clear()
            self._policy = policy
        price = None
        if policy.has_cost_budgets:
            found = policy.pricing.for_model(model)
            price = found.pattern if found is not None else None
        key = (subject.nodes, price)
        hit = self._cache.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        planned = plan_limits(policy, subject, model, windows, now)
        # Valid until the first window ends; concurrency counters have no window, but
        # their garbage-collection horizon moves with time: re-plan at least each minute.
        until = min([p.limit.window_end for p in planned if not p.limit.release_on_settle],
                    default=now + 60.0)  # fmt: skip
        self._cache.offer(key, (min(until, now + 60.0), planned))
        return planned


class QueueFull(Exception):
    """More checks are waiting than the policy's max_depth allows."""


@dataclass(eq=False, slots=True)
class _Waiter:
    priority: int
    seq: int
    key: str
    wake: asyncio.Event


class AdmissionQueue:
    """Checks held back by a rate wait here: highest priority first, FIFO within one.

    There is one line per refused counter (one team's TPM), so a saturated team never
    holds up another. Only the head of a line retries; it retries when capacity may have
    freed (``notify``: a settlement, a release, an expiry in this process), at the
    counter's window end, and every ``poll_s`` (other replicas free capacity too).
    """

    def __init__(self, max_depth: int, poll_s: float = 0.05) -> None:
        self.max_depth = max_depth
        self.on_wait: Callable[[float], None] | None = None  # seconds each waiter waited
        self._poll_s = poll_s
        self._lines: dict[str, list[tuple[int, int, _Waiter]]] = {}
        self._seq = itertools.count()
        self._depth = 0

    @property
    def depth(self) -> int:
        return self._depth

    def notify(self) -> None:
        for line in self._lines.values():
            if line:
                line[0][2].wake.set()

    def _head(self, key: str) -> _Waiter | None:
        line = self._lines.get(key)
        return line[0][2] if line else None

    def _join(self, w: _Waiter) -> None:
        heapq.heappush(self._lines.setdefault(w.key, []), (-w.priority, w.seq, w))
        self._head(w.key).wake.set()  # type: ignore[union-attr]

    def _leave(self, w: _Waiter) -> None:
        line = self._lines.get(w.key, [])
        line[:] = [e for e in line if e[2] is not w]
        heapq.heapify(line)
        if line:
            line[0][2].wake.set()  # the next in line tries at once
        else:
            self._lines.pop(w.key, None)

    async def wait(
        self,
        key: str,
        priority: int,
        timeout_s: float,
        attempt: Callable[[], Awaitable[tuple[T | None, str, float]]],
    ) -> T | None:
        """Retry ``attempt`` in turn until it returns a result or ``timeout_s`` passes.

        ``attempt`` returns (result, key, retry_at_delay): result None means still
        refused, by the counter ``key``; ``retry_at_delay`` seconds until it resets.
        Cancellation (Envoy gave up) leaves the line; nothing is held.
        """
        if self._depth >= self.max_depth:
            raise QueueFull(f"{self._depth} checks are already waiting")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        w = _Waiter(priority, next(self._seq), key, asyncio.Event())
        self._depth += 1
        self._join(w)
        try:
            delay = self._poll_s
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.wake.wait(), min(left, max(0.001, delay)))
                w.wake.clear()
                if self._head(w.key) is not w:
                    continue
                result, refused_key, reset_in = await attempt()
                if result is not None:
                    return result
                if refused_key != w.key:  # now held back by another counter: change lines
                    self._leave(w)
                    w.key = refused_key
                    self._join(w)
                delay = min(self._poll_s, reset_in) if reset_in > 0 else self._poll_s
        finally:
            self._depth -= 1
            self._leave(w)
            if self.on_wait is not None:
                self.on_wait(loop.time() - (deadline - timeout_s))
