"""What the enforcer tells the rest of the service about its decisions.

The enforcer decides; audit, alerts and anything else that wants to know about decisions
hang off this one hook instead of being called from inside the pipeline. An observer is
called on the request path, so it must return at once: it records or queues, and does
its I/O elsewhere (see :class:`authz.audit.trail.AuditTrail`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from authz.decision import Decision

__all__ = ["Observer", "Observers"]

log = logging.getLogger("authz.observer")


class Observer(Protocol):
    def decided(self, decision: Decision) -> None:
        """One Check was decided (allow or deny). Must not block or raise."""
        ...


class Observers:
    """Several observers behind one; a failing observer never fails a Check."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    def decided(self, decision: Decision) -> None:
        for observer in self._observers:
            try:
                observer.decided(decision)
            except Exception:
                log.exception("observer %s failed", type(observer).__name__)

    def settlement_bounded(self, event: object) -> None:
        """A settlement was clamped or charged without reading the body
        (:class:`authz.usage.bounds.SettlementBound`); for observers that record it."""
        for observer in self._observers:
            notify = getattr(observer, "settlement_bounded", None)
            if notify is None:
                continue
            try:
                notify(event)
            except Exception:
                log.exception("observer %s failed", type(observer).__name__)
