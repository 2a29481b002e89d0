"""What the management API shows: the hierarchy, and a node's counters right now.

Counter keys are built as :func:`authz.admission.plan_limits` builds them (budget or
rate name, node, window start), so the used and reserved figures are the very counters
checks spend; tests/unit/test_manage_views.py holds the two spellings together.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz.ledger.base import Ledger, Limit
from authz.manage.model import parse_node
from authz.manage.overlay import Overlay
from authz.policy.model import Policy
from authz.policy.periods import PeriodWindows

__all__ = ["Counter", "NodeInfo", "counters_for", "nodes_known"]


@dataclass(frozen=True, slots=True)
class Counter:
    name: str
    kind: str  # "budget", or the rate's kind (requests_per_minute, ...)
    period: str  # hour, day, week, month; "minute" for rates; "" for concurrency
    unit: str  # tokens, cost (micro-units), requests
    yaml_limit: int  # the policy's hard ceiling (grace and burst included)
    limit: int  # with active allocations applied: what checks are held to
    used: int
    reserved: int
    remaining: int
    window_start: float | None
    reset_at: float | None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node: str
    level: str
    name: str
    parent: str | None
    sources: tuple[str, ...]  # policy, seen, allocation


async def counters_for(node: str, policy: Policy, ledger: Ledger, overlay: Overlay | None,
                       now: float) -> list[Counter]:  # fmt: skip
    """The budgets and rates counted on ``node`` itself (not those of its ancestors)."""
    path = parse_node(node)
    leaf = path.leaf
    assert leaf is not None
    windows = PeriodWindows(policy.timezone)
    out: list[Counter] = []
    for b in policy.budgets_for(path):
        if b.level != leaf.level:
            continue
        start, end = windows.get(b.period, now)
        yaml_amount = b.tokens + b.soft_grace + b.burst
        delta = overlay.delta(b.name, node, now) if overlay is not None else 0
        amount = max(0, yaml_amount + delta)
        limit = Limit(f"{b.name}|{node}|{int(start)}", b.name, node, amount, end, b.weights)
        bal = await ledger.balance(limit)
        left = max(0, amount - bal.used - bal.reserved)
        out.append(Counter(b.name, "budget", b.period, b.unit, yaml_amount, amount, bal.used,
                           bal.reserved, left, start, end))  # fmt: skip
    for r in policy.rates_for(path):
        if r.level != leaf.level:
            continue
        if r.kind == "concurrent":
            key, start_or_none, end_or_none, period = f"{r.name}|{node}|c", None, None, ""
            end = now + 60
        else:
            start, end = windows.get("minute", now)
            key, start_or_none, end_or_none, period = (f"{r.name}|{node}|{int(start)}", start,
                                                       end, "minute")  # fmt: skip
        limit = Limit(key, r.name, node, r.amount, end, policy.weights)
        bal = await ledger.balance(limit)
        unit = "tokens" if r.kind == "tokens_per_minute" else "requests"
        out.append(Counter(r.name, r.kind, period, unit, r.amount, r.amount, bal.used,
                           bal.reserved, max(0, r.amount - bal.used - bal.reserved),
                           start_or_none, end_or_none))  # fmt: skip
    return out


def _policy_nodes(policy: Policy) -> set[str]:
    """Nodes a budget or rate names exactly (up to its first wildcard)."""
    found: set[str] = set()
    for match in [b.match for b in policy.budgets] + [r.match for r in policy.rates]:
        key = ""
        for level, name in match:
            if name == "*" or (level != "org" and not key):
                break
            key = f"{key}/{level}:{name}" if key else f"{level}:{name}"
            found.add(key)
    return found


def nodes_known(policy: Policy, seen: frozenset[str], allocated: set[str]) -> list[NodeInfo]:
    """Every node of the hierarchy the service knows, with its ancestors, sorted."""
    sources: dict[str, set[str]] = {}
    for source, keys in (("policy", _policy_nodes(policy)), ("seen", seen),
                         ("allocation", allocated)):  # fmt: skip
        for key in keys:
            parts = key.split("/")
            for i in range(1, len(parts) + 1):  # the ancestors exist too
                sources.setdefault("/".join(parts[:i]), set()).add(source)
    out = []
    for key in sorted(sources):
        last = key.rpartition("/")
        level, _, name = last[2].partition(":")
        out.append(NodeInfo(key, level, name, last[0] or None, tuple(sorted(sources[key]))))
    return out
