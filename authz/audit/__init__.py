"""The audit trail: a hash-chained, append-only log of budget and policy events.

trail = AuditTrail(policy, ledger_url, clock, metrics)   # queue + writer task
log = open_audit_log(ledger_url, policy.audit.file)      # FileAuditLog | RedisAuditLog
result = await verify_log(log)                           # Verified | Broken
"""

from __future__ import annotations

from authz.audit.base import AuditLog
from authz.audit.chain import Broken, Entry, Verified, Walker, verify
from authz.audit.open import open_audit_log
from authz.audit.trail import AuditTrail

__all__ = [
    "AuditLog",
    "AuditTrail",
    "Broken",
    "Entry",
    "Verified",
    "open_audit_log",
    "verify",
    "verify_log",
]


async def verify_log(log: AuditLog) -> Verified | Broken:
    """Walk the whole chain; then check it ends at the head the store recorded, if any."""
    walker = Walker()
    last = "the start"
    async for where, raw in log.stored():
        broken = walker.feed(where, raw)
        if broken is not None:
            return broken
        last = where
    head = await log.head()
    if head is not None and head != walker.prev:
        return Broken(
            f"after {last}",
            walker.count + 1,
            "the recorded head is not the last entry's hash (entries cut off the end)",
        )
    return Verified(walker.count, walker.prev)
