"""When a replica should get traffic: what ``/readyz`` answers, and why.

Ready means "a check sent here gets a real answer". So a replica is not ready:

- before it serves, and from the moment it starts stopping;
- until its ledger has answered once (a PING). A wrong Redis URL used to start
  "ready" and answer 503 to every request; now it never joins the Service, and a
  rollout with it stalls instead of replacing working replicas;
- while the breaker is open (or half-open) in ``fail_closed`` mode: every check here
  would be a 503 anyway. If only this replica lost the store (its node's network, its
  DNS), leaving the Service sends the traffic to replicas that still answer. If they
  all lost it, clients see 503 either way (Envoy's ``status_on_error`` instead of
  ours, without the JSON body and ``retry-after``), a price worth paying for the
  partial case.

In ``fail_open`` and ``local_allowance`` an open breaker does not fail readiness: this
replica still answers (admitting, journaling), and failing readiness would take every
replica sharing the store out at once and turn a degraded service into an outage. The
body then says ``"status": "degraded"`` with the breaker's snapshot, for operators and
alerts.

The directory (policy ``directory``, authz/directory) follows the same rule: down with
``on_down: deny`` every check of a subject not in the cache would be a 503, so the
replica is not ready; with ``last_known`` or ``fallback`` it still places callers and
says ``"degraded"`` with the directory's state under ``"directory"``.

Nothing here depends on traffic: :meth:`Readiness.watch` pings the ledger through the
breaker every ``interval_s``, which both notices a store gone quiet and, once the
breaker has cooled down, is its half-open probe, so an unready replica comes back
without waiting for a request it cannot get. The embedded ledgers (no breaker) cannot
be unreachable and are ready as soon as the service serves.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from authz.directory.stats import DirectoryStats
from authz.ledger.breaker import BreakerLedger, BreakerState

__all__ = ["Readiness"]

log = logging.getLogger("authz.readiness")


class Readiness:
    def __init__(self, breaker: BreakerLedger | None, backend: str) -> None:
        self._breaker = breaker
        self._backend = backend
        self.serving = False  # set once the ports serve; cleared when stopping starts
        self.ledger_answered = breaker is None
        self.directory: DirectoryStats | None = None  # the enforcer's, set by the server

    def state(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the /readyz body)."""
        ready, body = self._ledger_state()
        d = self.directory
        if d is None or not d.configured:
            return ready, body
        body["directory"] = d.as_dict()
        if d.up or not ready:
            return ready, body
        if d.on_down_mode == "deny":
            why = "directory unreachable: with on_down deny, uncached subjects would get 503"
            return False, {**body, "status": "not ready", "reason": why}
        if body["status"] == "ready":
            body["status"], body["reason"] = "degraded", f"directory unreachable, {d.on_down_mode}"
        return ready, body

    def _ledger_state(self) -> tuple[bool, dict[str, Any]]:
        if self._breaker is None:
            ledger: dict[str, Any] = {"backend": self._backend}
        else:
            ledger = self._breaker.snapshot().as_dict()
        body: dict[str, Any] = {"ledger": ledger}
        if not self.serving:
            return False, {"status": "not ready", "reason": "not serving", **body}
        if not self.ledger_answered:
            why = "the ledger has not answered yet (see ledger.last_error)"
            return False, {"status": "not ready", "reason": why, **body}
        if self._breaker is None:
            return True, {"status": "ready", **body}
        snap = self._breaker.snapshot()
        if snap.state is BreakerState.CLOSED:
            return True, {"status": "ready", **body}
        if snap.mode == "fail_closed":
            why = "ledger unreachable: with breaker mode fail_closed every check would be 503"
            return False, {"status": "not ready", "reason": why, **body}
        return True, {"status": "degraded", "reason": f"ledger unreachable, {snap.mode}", **body}

    async def watch(self, interval_s: float = 1.0) -> None:
        """Ping the ledger every ``interval_s`` (faster until its first answer)."""
        if self._breaker is None:
            return
        warned = False
        while True:
            if await self._breaker.ping():
                if not self.ledger_answered:
                    log.info("ledger answered: ready")
                self.ledger_answered = True
            elif not self.ledger_answered and not warned:
                warned = True
                log.warning(
                    "ledger not answering (%s); not ready until it does",
                    self._breaker.snapshot().last_error or "no answer",
                )
            await asyncio.sleep(interval_s if self.ledger_answered else min(interval_s, 0.25))
