"""Validation of the budget keys of issue 16: ``renamed_from``, ``enforce``, ``rollover``,
``group``.

- ``renamed_from: <old name>``: the budget was called that before. A budget's counter is
  keyed by its name, its node and its window's start, so a plain rename would open a
  fresh counter mid-period; with ``renamed_from`` the new counter of the current window
  opens with what the old one spent and holds (:func:`authz.admission.inherited`). It may
  stay in the file; it is only read when a window's counter is first opened.
- ``enforce: false``: an audit-only budget, counted, reported and alerted on like any
  other, never the reason for a refusal (the answer headers say when it would have been).
- ``rollover: {max: 50%}``: the unused part of a period's amount is added to the next
  period, up to ``max`` (units, or a share of the amount); the mirror of ``burst``,
  whose overdraft the next period pays back. A rollover budget carries its balance both
  ways: an overdraft (``soft`` grace) is paid back too.
- ``group: {project: apollo}``: one counter shared by every caller whose claims hold
  those values, across departments and teams (:mod:`authz.groups`); ``match`` still
  says where in the tree (``{org: "*"}``: anywhere). Counted per org.

Kept apart from :mod:`authz.policy.loader` as :mod:`authz.policy.loader_caps` is: the
loader hands each budget's raw mapping here and lists these keys as allowed. Errors read
like the loader's: ``file:budgets[1].renamed_from: names a budget still in the policy
(budgets[0]) (got 'team-daily')``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from authz.policy.loader_admission import Reader, amount_or_share
from authz.policy.model import Budget, Policy, Weights

__all__ = ["BUDGET_KEYS", "applied_renames", "check_renames", "with_budget_keys"]

BUDGET_KEYS = ("renamed_from", "enforce", "rollover", "group")
_NAME = r"[A-Za-z0-9_.:-]+"
R = TypeVar("R", bound=Reader)
Parse = Callable[[R, Any, str, Weights], Budget]


def with_budget_keys(r: R, raw: Any, p: str, weights: Weights, parse: Parse[R]) -> Budget:
    """``parse`` on ``raw`` without this module's keys, then those keys set on its budget."""
    if not isinstance(raw, dict):
        return parse(r, raw, p, weights)  # the loader names the error ("must be a mapping")
    budget = parse(r, {k: v for k, v in raw.items() if k not in BUDGET_KEYS}, p, weights)
    renamed = None
    if "renamed_from" in raw:
        renamed = r.string(raw["renamed_from"], f"{p}.renamed_from", _NAME)
        if renamed == budget.name:
            r.fail(f"{p}.renamed_from", "is the budget's own name", renamed)
    enforce = raw.get("enforce", True)
    if not isinstance(enforce, bool):
        r.fail(f"{p}.enforce", "must be true or false", enforce)
    rollover = 0
    if "rollover" in raw:
        m = r.mapping(raw["rollover"], f"{p}.rollover", {"max"}, {"max"})
        rollover = amount_or_share(r, m["max"], f"{p}.rollover.max", budget.tokens)
        if rollover == 0:
            r.fail(f"{p}.rollover.max", "must be more than 0 (leave rollover out)", m["max"])
    group = _group(r, raw["group"], f"{p}.group") if "group" in raw else ()
    return replace(budget, renamed_from=renamed, enforce=enforce, rollover=rollover,
                   group=group, level="group" if group else budget.level)  # fmt: skip


def _group(r: Reader, raw: Any, p: str) -> tuple[tuple[str, str], ...]:
    """``{claim: value, ...}``: every member's claims hold each value (a list claim: among
    its items). Values are compared as strings, as claims are (``1`` matches ``"1"``)."""
    if not isinstance(raw, dict) or not raw:
        r.fail(p, "must be a mapping of claim names to values, e.g. {project: apollo}", raw)
    pairs = []
    for claim, value in raw.items():
        if not isinstance(claim, str) or not claim:
            r.fail(p, "claim names must be non-empty strings", claim)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            r.fail(f"{p}.{claim}", "must be a non-empty string or a number", value)
        pairs.append((claim, str(value)))
    return tuple(sorted(pairs))


def check_renames(r: Reader, budgets: tuple[Budget, ...]) -> None:
    """A rename names a budget no longer in the policy, and only one budget takes it over:
    two counters continuing one would count its spend twice."""
    index = {b.name: i for i, b in enumerate(budgets)}
    taken: dict[str, int] = {}
    for i, b in enumerate(budgets):
        old = b.renamed_from
        if old is None:
            continue
        p = f"budgets[{i}].renamed_from"
        if old in index:
            r.fail(p, f"names a budget still in the policy (budgets[{index[old]}])", old)
        if old in taken:
            r.fail(p, f"budgets[{taken[old]}] is renamed from it already", old)
        taken[old] = i


def applied_renames(policy: Policy, previous: Policy) -> Policy:
    """``policy`` without the ``renamed_from`` of budgets the previous policy already
    had under their new name: that rename was applied by an earlier reload, and the
    window's counter goes on under the new name (another edit, e.g. of the timezone,
    must continue that counter, not the one of the old name)."""
    names = {b.name for b in previous.budgets}
    if not any(b.renamed_from is not None and b.name in names for b in policy.budgets):
        return policy
    budgets = tuple(
        replace(b, renamed_from=None) if b.renamed_from is not None and b.name in names else b
        for b in policy.budgets
    )
    return replace(policy, budgets=budgets)
