"""Budgets shared by a group (issue 16): a selector over claims names one counter.

A tree budget is counted on a node of the caller's path (their team, their department).
A group budget (``group: {project: apollo}``) is counted on one counter for everybody
whose claims hold those values, wherever they sit in the tree: a project that spans
departments gets one budget. Its limits join the tree's in the same all-or-nothing
reserve (period budgets first, then groups, then rates, so a rate refusal still means
every budget had room: :mod:`authz.admission`).

The counter is per org (``org:acme/group:<budget name>``): the org is the first node of
every path and the Redis ledger's hash tag, so a group's counter sits in the same
cluster slot as the rest of the caller's counters and the reserve stays one atomic
script. The same group in two orgs is two counters.

Membership comes from the claims of each request, which the path-keyed plan cache of
:class:`authz.admission.LimitPlanner` cannot see: a group's limits are built per check,
only for policies that have group budgets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.admission import PlannedLimit, budget_limit
from authz.policy.model import Budget, Policy, SubjectPath
from authz.policy.periods import PeriodWindows

__all__ = ["GroupPlanner", "is_member"]


def is_member(group: tuple[tuple[str, str], ...], claims: Mapping[str, Any]) -> bool:
    """Every (claim, value) holds: the claim equals the value, or a list claim has it."""
    for claim, want in group:
        have = claims.get(claim)
        if isinstance(have, list | tuple):
            if not any(_text(item) == want for item in have):
                return False
        elif have is None or _text(have) != want:
            return False
    return True


def _text(value: Any) -> str | None:
    # A bool is no group value (the loader refuses them): True must not match "1".
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


class GroupPlanner:
    """Adds the caller's group limits to a plan; remembers each policy's group budgets."""

    def __init__(self) -> None:
        self._policy: Policy | None = None
        self._groups: tuple[Budget, ...] = ()

    def add(self, plan: tuple[PlannedLimit, ...], policy: Policy, subject: SubjectPath,
            claims: Mapping[str, Any], model: str | None, windows: PeriodWindows,
            now: float) -> tuple[PlannedLimit, ...]:  # fmt: skip
        if policy is not self._policy:
            self._policy = policy
            self._groups = tuple(b for b in policy.budgets if b.group)
        if not self._groups:
            return plan
        org = subject.prefix_key("org")
        if org is None:
            return plan
        extra = []
        for b in self._groups:
            if b.applies_to(subject) and is_member(b.group, claims):
                limit = budget_limit(policy, b, f"{org}/group:{b.name}", model, windows, now)
                extra.append(PlannedLimit(limit, False, b))
        if not extra:
            return plan
        split = next((i for i, p in enumerate(plan) if p.rate), len(plan))
        return (*plan[:split], *extra, *plan[split:])
