"""What goes into the audit chain, and the one task that writes it.

Recorded (``kind``: ``data``):

- ``service_started``: the policy file and the SHA-256 of its bytes;
- ``policy_reloaded``: the same, after every successful reload;
- ``budget_changed``: one per budget added, removed or changed by a reload, with the
  budget before and after;
- ``policy_reload_failed``: the validation error (``file:path: what (got value)``);
- ``denied``: a Check denied for a reason the policy's ``audit.denials`` lists, with
  the subject, the reason, the budget and node that refused, the model.
- ``settlement_bounded``: a settlement not charged as the upstream reported: usage
  above what the request could have cost (clamped), or a body not read (too big decoded,
  an unsupported Content-Encoding: the reservation charged); counts, never content.

- ``allocation_created``, ``allocation_withdrawn``, ``quota_requested``,
  ``request_approved``, ``request_rejected``: the management API (authz/manage), with
  who, what, why and the amount (or frozen state) before and after.

Never a credential, a prompt, or the client's message text.

The request path only *queues* (:meth:`AuditTrail.decided` is an enforcer observer);
one writer task appends in order, so the chain follows the order of events. A full
queue or a store that stays down loses entries: each loss is counted
(``authz_audit_failures_total``) and logged, and the chain itself stays intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

from authz.audit.base import AuditLog
from authz.audit.open import open_audit_log
from authz.clock import Clock
from authz.decision import Decision
from authz.errors import AuthzError, PolicyError
from authz.policy.model import Budget, Policy
from authz.telemetry.metrics import Metrics
from authz.usage.bounds import SettlementBound

__all__ = ["AuditTrail"]

log = logging.getLogger("authz.audit")
_RETRIES = (0.1, 0.5, 2.0)


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _budget(b: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {
        "match": dict(b.match),
        "tokens": b.tokens,
        "period": b.period,
        "weights": {"input": b.weights.input, "cached_input": b.weights.cached_input,
                    "output": b.weights.output},
    }  # fmt: skip
    # Admission-control fields and issue 16's (turning enforcement off is audited too).
    for extra in ("unit", "soft_grace", "burst", "enforce", "rollover", "renamed_from", "group"):
        if hasattr(b, extra):
            out[extra] = getattr(b, extra)
    return out


def budget_changes(old: Policy, new: Policy) -> list[dict[str, Any]]:
    before = {b.name: _budget(b) for b in old.budgets}
    after = {b.name: _budget(b) for b in new.budgets}
    changes = []
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        change = "added" if a is None else "removed" if b is None else "changed"
        changes.append({"budget": name, "change": change, "before": a, "after": b})
    return changes


class AuditTrail:
    def __init__(
        self,
        policy: Policy,
        ledger_url: str,
        clock: Clock,
        metrics: Metrics,
        max_queue: int = 10_000,
    ) -> None:
        self._policy = policy
        self._ledger_url = ledger_url
        self._clock = clock
        self._metrics = metrics
        # None stops the writer; kind "" with a "_flush" future marks a flush point.
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], float] | None] = asyncio.Queue(
            max_queue
        )
        self._task: asyncio.Task[None] | None = None
        self._log: AuditLog | None = None
        self._target: tuple[str, str | None] | None = None
        self._lost = 0

    # ------------------------------------------------------------------ the events
    def started(self) -> None:
        p = self._policy
        self._put("service_started", {"policy": p.source, "sha256": _sha256(p.source)})

    def reloaded(self, policy: Policy) -> None:
        old, self._policy = self._policy, policy
        self._put("policy_reloaded", {"policy": policy.source, "sha256": _sha256(policy.source)})
        for change in budget_changes(old, policy):
            self._put("budget_changed", change)

    def reload_failed(self, error: PolicyError) -> None:
        self._put("policy_reload_failed", {"policy": error.file, "error": str(error)})

    def decided(self, d: Decision) -> None:
        """Enforcer observer: queue the denials the policy wants audited."""
        if d.reason is None or d.reason.value not in self._policy.audit.denials:
            return
        data: dict[str, Any] = {"reason": d.reason.value, "status": d.status}
        if d.detail:
            data["detail"] = d.detail
        if d.subject is not None:
            data["subject"] = str(d.subject)
        if d.model is not None:
            data["model"] = d.model
        if d.quota is not None:
            data["budget"], data["node"] = d.quota.budget, d.quota.node
            data["limit"], data["remaining"] = d.quota.limit, d.quota.remaining
        self._put("denied", data)

    def settlement_bounded(self, event: SettlementBound) -> None:
        """A settlement charged other than the upstream reported (authz.usage.bounds)."""
        self._put("settlement_bounded", event.as_dict())

    def record(self, kind: str, data: dict[str, Any]) -> None:
        """An entry from elsewhere in the service (the management API's changes)."""
        self._put(kind, data)

    def _put(self, kind: str, data: dict[str, Any]) -> None:
        if not self._policy.audit.enabled:
            return
        try:
            self._queue.put_nowait((kind, data, self._clock.now()))
        except asyncio.QueueFull:
            self._lose(kind, "the audit queue is full")

    def _lose(self, kind: str, why: str) -> None:
        self._metrics.audit_failures.inc()
        self._lost += 1
        if self._lost == 1 or self._lost % 1000 == 0:
            log.error("audit entry lost (%s): %s; %d lost so far", kind, why, self._lost)

    # ------------------------------------------------------------------ the writer
    async def _store(self) -> AuditLog | None:
        target = (self._ledger_url, self._policy.audit.file)
        if target != self._target:
            if self._log is not None:
                await self._log.close()
            self._log, self._target = None, target
            try:
                self._log = open_audit_log(*target)
            except ValueError as exc:
                log.error("audit trail off: %s", exc)
        return self._log

    async def _write(self, kind: str, data: dict[str, Any], ts: float) -> None:
        if not kind:  # a flush marker: everything before it is written
            data["_flush"].set_result(None)
            return
        for delay in (*_RETRIES, None):
            store = await self._store()
            if store is None:
                self._lose(kind, "no audit store is configured")
                return
            try:
                entry = await store.append(kind, data, ts)
            except (AuthzError, OSError) as exc:
                if delay is None:
                    self._lose(kind, str(exc))
                    return
                await asyncio.sleep(delay)
                continue
            self._metrics.audit_entries.labels(kind).inc()
            log.debug("audit", extra={"audit_seq": entry.seq, "audit_kind": kind})
            return

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            await self._write(*item)

    async def flush(self) -> None:
        """Write everything queued so far, in order (tests; the writer keeps running)."""
        if self._task is None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None:
                    await self._write(*item)
            return
        done = asyncio.get_running_loop().create_future()
        await self._queue.put(("", {"_flush": done}, 0.0))
        await done

    async def close(self) -> None:
        """Write what is queued, stop the writer, close the store (graceful stop)."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        else:
            await self.flush()
        if self._log is not None:
            with contextlib.suppress(Exception):
                await self._log.close()
            self._log = None
