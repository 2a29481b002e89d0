"""``authz check-config --ledger URL``: the policy as checks see it, allocations applied.

Reads the allocation store beside the ledger (authz/manage/store.py) and prints, for
each budget and node an active allocation changes, the YAML amount and the effective
one, then the active freezes. Offline: no service needs to run.
"""

from __future__ import annotations

import asyncio
import time

from authz.manage.model import Allocation
from authz.manage.store import open_allocation_store
from authz.policy.model import Policy

__all__ = ["effective_lines"]


async def _load(url: str, state_dir: str) -> tuple[Allocation, ...]:
    store = open_allocation_store(url, state_dir)
    try:
        return await store.all()
    finally:
        await store.close()


def effective_lines(policy: Policy, url: str, state_dir: str = ".",
                    now: float | None = None) -> list[str]:  # fmt: skip
    """Lines describing the allocations in force (ValueError/AuthzError if unreadable)."""
    at = time.time() if now is None else now
    active = [a for a in asyncio.run(_load(url, state_dir)) if a.active(at)]
    lines: list[str] = []
    groups: dict[tuple[str, str], list[Allocation]] = {}
    for a in active:
        if a.budget is not None:
            groups.setdefault((a.budget, a.node), []).append(a)
    budgets = {b.name: b for b in policy.budgets}
    for (name, node), items in sorted(groups.items()):
        b = budgets.get(name)
        if b is None:
            lines.append(f"budget {name} on {node}: no longer in the policy; its allocations"
                         f" ({', '.join(a.id for a in items)}) do nothing")  # fmt: skip
            continue
        yaml_amount = b.tokens + b.soft_grace + b.burst
        delta = sum(a.tokens for a in items)
        parts = ", ".join(f"{a.id} {a.kind} {a.tokens:+d}" for a in items)
        lines.append(f"budget {name} on {node}: {yaml_amount} in the YAML, effective"
                     f" {max(0, yaml_amount + delta)} ({parts})")  # fmt: skip
    for a in sorted((a for a in active if a.kind == "freeze"), key=lambda a: a.node):
        until = "lifted" if a.expires_at is None else time.strftime(
            "%Y-%m-%d %H:%M:%SZ", time.gmtime(a.expires_at))
        lines.append(f"frozen: {a.node} until {until} ({a.id}: {a.reason})")
    if not lines:
        lines.append("no allocation in force: the YAML is the effective policy")
    return lines
