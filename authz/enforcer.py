"""The decision pipeline: identity -> subject -> estimate -> budgets -> ledger -> Decision.

This module knows nothing about Envoy or HTTP frameworks; :mod:`authz.envoy` converts
protocol messages to :class:`CheckInput` and :class:`Decision` back to responses.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from authz.admission import AdmissionQueue, LimitPlanner, QueueFull, Unpriced
from authz.answers import (
    budget_denial,
    local_denial,
    quota_for,
    rate_denial,
    warnings_for,
)
from authz.apis import Api, route
from authz.clock import Clock
from authz.confirm import confirm as confirm_hold
from authz.confirm import tentative
from authz.decision import Decision, DenyReason, Verdict
from authz.directory import Directory, DirectoryStats, DirectoryUnavailable, given_for
from authz.errors import BodyError, IdentityError, LedgerUnavailable
from authz.estimate import RequestEstimate, estimate_request
from authz.groups import GroupPlanner
from authz.identity import Authenticator
from authz.ledger.base import Ledger, Limit, Refusal, Reservation
from authz.manage.overlay import Overlay
from authz.observer import Observer
from authz.offload import INLINE_BYTES, run_off_loop
from authz.output_cap import cap_rules, reserve_capped
from authz.policy.model import Policy, SubjectPath
from authz.policy.periods import PeriodWindows
from authz.policy.store import PolicyStore
from authz.policy.subject import SubjectUnmapped, map_subject
from authz.price_settle import settle_price
from authz.recent import Recent
from authz.usage.bounds import SettlementBound
from authz.usage.types import TokenUsage

__all__ = ["IDLE_S", "CheckInput", "Enforcer"]

log = logging.getLogger("authz.enforcer")
_NO_USAGE = TokenUsage(0, 0, 0)
# Per-caller memos keep what was used in the last IDLE_S to 2 * IDLE_S seconds.
IDLE_S = 60.0


@dataclass(frozen=True, slots=True)
class CheckInput:
    method: str
    path: str
    headers: Mapping[str, str]  # lowercase names
    body: bytes | None
    body_truncated: bool = False
    envoy_jwt_payload: Mapping[str, Any] | None = None
    # The gateway confirms a hold when it uses the answer (Envoy's ext_proc stream,
    # authz.confirm); until then the hold is tentative. False: it lives ttl_s at once.
    confirmed_later: bool = False


class Enforcer:
    def __init__(
        self, store: PolicyStore, ledger: Ledger, clock: Clock, observer: Observer | None = None
    ) -> None:
        self._observer = observer  # told of every decision (audit, alerts); None: nobody
        self.gateway_confirms = False  # set by the first confirmation (authz.confirm)
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self._policy = store.current
        self._windows = PeriodWindows(self._policy.timezone)
        self._auth = Authenticator(self._policy.identity, clock=clock)
        self._retired: list[Authenticator] = []
        self._warming: asyncio.Task[None] | None = None
        self._queue = AdmissionQueue(self._policy.queue.max_depth)
        self._planner = LimitPlanner()
        self._groups = GroupPlanner()  # budgets shared by a group of callers (issue 16)
        self._subjects: Recent[int, tuple[Mapping[str, Any], SubjectPath]] = Recent()
        self._subjects_policy: Policy | None = None
        # The org chart from LDAP (policy directory): kept across reloads unless its
        # settings change; the stats outlive each Directory (metrics, /readyz).
        self.directory_stats = DirectoryStats(configured=False)
        self._retired_directories: list[Directory] = []
        self._directory = self._new_directory(self._policy)
        self._idle_at = clock.now()  # the last forget_idle rotation
        # Runtime allocations over the YAML (authz/manage): freezes and raised or lowered
        # amounts, applied to each plan. None: the YAML alone.
        self.overlay: Overlay | None = None
        store.on_change(self._use_policy)

    def _use_policy(self, policy: Policy) -> None:
        if policy.identity != self._policy.identity:
            # Swap at once; close the old one a little later, as checks already inside
            # its authenticate() may still be using its JWKS cache and HTTP client.
            old, self._auth = self._auth, Authenticator(policy.identity, clock=self._clock)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # reloaded outside the server (tests, tools)
                self._retired.append(old)
            else:
                self._warming = loop.create_task(self._swap_authenticator(old))
        if policy.timezone != self._policy.timezone:  # windows go on (issue 16)
            self._windows = PeriodWindows(
                policy.timezone, previous=self._policy.timezone, since=self._clock.now()
            )
        if policy.directory != self._policy.directory:
            old_dir, self._directory = self._directory, self._new_directory(policy)
            if old_dir is not None:  # closed with the enforcer (its threads idle till then)
                old_dir.retire()
                self._retired_directories.append(old_dir)
        self._policy = policy

    def _new_directory(self, policy: Policy) -> Directory | None:
        self.directory_stats.configured = policy.directory is not None
        if policy.directory is None:
            return None
        self.directory_stats.up = True
        return Directory(policy.directory, self._clock, self.directory_stats)

    @property
    def directory(self) -> Directory | None:
        """The directory the current policy names (authz.directory.directory_nodes)."""
        return self._directory

    @property
    def policy(self) -> Policy:
        return self._policy

    async def _swap_authenticator(self, old: Authenticator) -> None:
        await self.start()
        await asyncio.sleep(5.0)
        await old.aclose()

    async def start(self) -> None:
        """Warm what the first checks would otherwise wait for (the issuer's JWKS)."""
        try:
            await self._auth.start()
        except IdentityError as exc:
            log.error("could not load the JWKS at start; will retry on first use: %s", exc)

    async def aclose(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        for auth in [*self._retired, self._auth]:
            await auth.aclose()
        for directory in [*self._retired_directories, self._directory]:
            if directory is not None:
                await directory.aclose()

    # -- the request path ---------------------------------------------------------
    async def check(self, req: CheckInput) -> Decision:
        decision = await self._decide(req)
        if self._observer is not None:
            self._observer.decided(decision)
        return decision

    async def _decide(self, req: CheckInput) -> Decision:
        policy = self._policy
        try:
            identity = await self._auth.authenticate(req.headers, req.envoy_jwt_payload)
        except IdentityError as exc:
            return Decision(Verdict.DENY, 401, DenyReason.UNAUTHENTICATED, exc.reason, str(exc))
        try:
            if self._directory is not None:  # the path changes with the directory: no memo
                given = await given_for(self._directory, policy.subject, identity.claims)
                subject = map_subject(policy.subject, identity.claims, given)
            elif identity.kind == "envoy_jwt_authn":  # a fresh dict per request: no reuse
                subject = map_subject(policy.subject, identity.claims)
            else:
                subject = self._subject(policy, identity.claims)
        except SubjectUnmapped as exc:
            return Decision(Verdict.DENY, 403, DenyReason.SUBJECT_UNMAPPED, exc.level, str(exc))
        except DirectoryUnavailable as exc:
            msg = ("The directory that names this caller's department and team is unreachable,"
                   " and the policy refuses requests it cannot place (directory.on_down).")
            log.debug("directory unavailable: %s", exc)
            return Decision(Verdict.DENY, 503, DenyReason.DIRECTORY_UNAVAILABLE,
                            "directory_down", msg, retry_after_s=1.0)  # fmt: skip
        frozen = None if self.overlay is None else self.overlay.frozen(subject, self._clock.now())
        if frozen is not None:
            msg = (f"{frozen.node} is frozen by the quota administrators ({frozen.reason});"
                   " new requests are refused until the freeze is lifted")  # fmt: skip
            return Decision(Verdict.DENY, 403, DenyReason.NODE_FROZEN, "frozen", msg,
                            subject=subject)  # fmt: skip

        # Metered whatever the spelling of the path; free only if requests.unmetered
        # lists every reading of it; anything else refused (authz.apis.route).
        where = route(req.method, req.path, policy.requests.unmetered)
        if where.api is None:
            if where.unmetered:
                return Decision(Verdict.ALLOW, subject=subject)
            return Decision(
                Verdict.DENY,
                where.status,
                DenyReason.PATH_NOT_ALLOWED,
                where.detail,
                where.message,
                subject=subject,
            )
        api = where.api

        estimate, bad = await self._estimate(policy, api, req)
        if estimate is None:
            if policy.requests.bad_body == "deny":
                return Decision(
                    Verdict.DENY,
                    400,
                    DenyReason.BAD_REQUEST,
                    "invalid_body",
                    bad,
                    subject=subject,
                    api=api,
                )
            tokens = TokenUsage(policy.requests.bad_body_tokens, 0, 0)
            model, stream = None, False
        else:
            model, stream = estimate.model, estimate.stream
            output = estimate.max_output_tokens
            default = policy.models.default_output(model)
            if default is None or (
                policy.models.unknown == "deny" and not policy.models.is_known(model)
            ):
                return Decision(
                    Verdict.DENY,
                    400,
                    DenyReason.UNKNOWN_MODEL,
                    "model_not_budgeted",
                    f"model {model!r} has no budget rule in the policy",
                    subject=subject,
                    api=api,
                    model=model,
                )
            tokens = TokenUsage(estimate.input_tokens, 0, default if output is None else output)
        refused = policy.access.refusal(subject, model)  # before anything is reserved
        if refused is not None:
            return Decision(Verdict.DENY, 403, DenyReason.MODEL_NOT_ALLOWED, "model_not_allowed",
                            refused, subject=subject, api=api, model=model)  # fmt: skip
        deferred = await self._off_peak(policy, subject, api, model)
        if deferred is not None:
            return deferred
        choices = estimate.choices if estimate is not None else 1
        return await self._reserve(
            policy, subject, api, model, stream, tokens, identity.claims, choices,
            tentative_hold=req.confirmed_later,
        )  # fmt: skip

    async def _off_peak(self, policy: Policy, subject: SubjectPath, api: Api, model: str | None
                        ) -> Decision | None:  # fmt: skip
        """Non-critical work yields during peak hours: wait if the peak ends within
        max_wait (``during_peak: queue``), else 429 with retry-after to the off-peak start."""
        sched = policy.schedule
        if sched is None or not sched.is_non_critical(subject):
            return None
        now = self._clock.now()
        ends = sched.peak_ends_at(now, policy.timezone)
        if ends is None:
            return None
        if sched.during_peak == "queue" and ends - now <= policy.queue.max_wait_s:
            await asyncio.sleep(ends - now)
            return None
        msg = f"{subject} is non-critical and deferred during peak hours; retry after the peak"
        return Decision(Verdict.DENY, 429, DenyReason.OFF_PEAK, "peak_hours", msg, subject=subject,
                        api=api, model=model, retry_after_s=ends - now)  # fmt: skip

    def _subject(self, policy: Policy, claims: Mapping[str, Any]) -> SubjectPath:
        """map_subject, memoised per claims object: the JWT cache hands out one shared
        claims mapping per token, so a caller's path is mapped once, not per check. The
        entry keeps the mapping alive, so its id cannot be reused while cached."""
        if policy is not self._subjects_policy:
            self._subjects.clear()
            self._subjects_policy = policy
        hit = self._subjects.get(id(claims))
        if hit is not None and hit[0] is claims:
            return hit[1]
        subject = map_subject(policy.subject, claims)
        # Kept from a subject's second check on (claims are a new object per check
        # until the token is cached): by the subject, not by id(claims), which recurs.
        self._subjects.offer(id(claims), (claims, subject), subject.nodes)
        return subject

    def forget_idle(self, idle_s: float = IDLE_S) -> int:
        """Forget per-caller state not used for ``idle_s`` to ``2 * idle_s`` seconds (issue
        9, #7: memory bounded by activity): subject and plan memos, the policy's per-path
        caches, verified tokens. Called by the server's sweep every second; rotates once
        per ``idle_s``. Returns how many entries went (0 between rotations)."""
        now = self._clock.now()
        if now - self._idle_at < idle_s:
            return 0
        self._idle_at = now
        return (
            self._subjects.rotate()
            + self._planner.forget_idle()
            + self._policy.forget_idle()
            + self._auth.forget_idle(now, idle_s)
        )

    async def _estimate(self, policy: Policy, api: Api, req: CheckInput
                        ) -> tuple[RequestEstimate | None, str]:  # fmt: skip
        body = req.body or b""
        # Envoy never sends more than its cap (bounds.request_body_bytes): a bigger body
        # did not come through it, and is not parsed (handled as truncated).
        if req.body_truncated or len(body) > policy.bounds.request_body_bytes:
            return None, "request body is larger than the gateway forwards for checking"
        try:
            if len(body) <= INLINE_BYTES:
                return estimate_request(api, body), ""
            # A big body costs tens of ms per MiB to parse: not on the loop (offload.py).
            return await run_off_loop(estimate_request, api, body), ""
        except BodyError as exc:
            return None, str(exc)

    def limits_for(self, policy: Policy, subject: SubjectPath, model: str | None = None
                   ) -> tuple[Limit, ...]:  # fmt: skip
        plan = self._planner.plan(policy, subject, model, self._windows, self._clock.now())
        return tuple(p.limit for p in plan)

    async def _reserve(
        self,
        policy: Policy,
        subject: SubjectPath,
        api: Api,
        model: str | None,
        stream: bool,
        tokens: TokenUsage,
        claims: Mapping[str, Any],
        choices: int = 1,
        *,
        tentative_hold: bool = False,
    ) -> Decision:
        allow = Decision(
            Verdict.ALLOW,
            subject=subject,
            api=api,
            model=model,
            stream=stream,
            input_estimate=tokens.input_tokens,
            output_reserved=tokens.output_tokens,
        )
        try:
            plan = self._planner.plan(policy, subject, model, self._windows, self._clock.now())
            plan = self._groups.add(plan, policy, subject, claims, model, self._windows,
                                    self._clock.now())  # fmt: skip
        except Unpriced:
            msg = f"model {model!r} has no price, and a cost budget applies to {subject}"
            return replace(allow, verdict=Verdict.DENY, status=400, reason=DenyReason.UNKNOWN_MODEL,
                           detail="model_not_priced", message=msg)  # fmt: skip
        if not plan:
            return allow
        if self.overlay is not None:
            plan = self.overlay.apply(plan, self._clock.now())
        limits = tuple(p.limit for p in plan)
        rates = {p.limit.key for p in plan if p.rate}
        expiry = tokens
        if policy.reservations.on_expiry == "input_estimate":
            expiry = TokenUsage(tokens.input_tokens, 0, 0)
        # The org rides in the id so a clustered ledger can find the org's slot on settle.
        rid = f"{os.urandom(16).hex()}@{subject.org}"  # uuid4's randomness, a tenth the cost
        label = policy.models.label(model)
        refusal: Refusal | None = None
        want, cap = tokens, None  # lowered to what fits (authz.output_cap)

        hold_s, first_charge = (
            tentative(policy, self._ledger)
            if tentative_hold and self.gateway_confirms
            else (policy.reservations.ttl_s, None)
        )

        async def reserve(amount: TokenUsage) -> Reservation | Refusal:
            now, charge = self._clock.now(), expiry if first_charge is None else first_charge
            if charge.output_tokens > amount.output_tokens:  # on_expiry: reserved
                charge = amount
            return await self._ledger.reserve(
                rid, limits, amount, deadline=now + hold_s, expiry_charge=charge, model=label
            )

        async def attempt() -> tuple[Reservation | None, str, float]:
            nonlocal refusal
            now = self._clock.now()
            out = await reserve(want)
            if isinstance(out, Refusal):
                refusal = out
                return None, out.limit.key, max(0.0, out.limit.window_end - now)
            return out, "", 0.0

        try:
            reservation, _, _ = await attempt()
            assert reservation is not None or refusal is not None
            if reservation is None and refusal is not None and refusal.limit.key not in rates:
                capped = await reserve_capped(reserve, tokens, refusal, cap_rules(plan), choices)
                want, cap = capped.tokens, capped.cap
                if isinstance(capped.outcome, Reservation):
                    reservation = capped.outcome
                else:
                    refusal = capped.outcome
            queueable = refusal is not None and refusal.limit.key in rates
            if reservation is None and queueable and policy.queue.max_wait_s > 0:
                assert refusal is not None
                reservation = await self._queue_for(policy, subject, claims, refusal, attempt)
        except QueueFull as exc:
            assert refusal is not None
            why = f"the wait queue is full ({exc})"
            return rate_denial(allow, refusal, why, "queue_full", self._clock.now())
        except LedgerUnavailable as exc:
            # Debug only: the breaker (authz.ledger.breaker) logs each state change once;
            # a line per refused request would flood the log for the whole outage.
            log.debug("ledger unavailable: %s", exc)
            msg = (
                "The token quota service is unreachable, so this request cannot be checked "
                "against its budget and is refused (the gateway fails closed); retry shortly."
            )
            return replace(
                allow, verdict=Verdict.DENY, status=503, reason=DenyReason.LEDGER_UNAVAILABLE,
                message=msg,
            )  # fmt: skip
        if reservation is None:
            assert refusal is not None
            if refusal.retry_after_s is not None:
                return local_denial(allow, refusal)
            if refusal.limit.key in rates:
                waited = " after waiting the policy's max_wait" if policy.queue.max_wait_s else ""
                return rate_denial(
                    allow, refusal, f"rate limit reached{waited}", "", self._clock.now()
                )
            return budget_denial(allow, refusal, self._clock.now())
        # reservation.id, not rid: a breaker admitting locally returns "local:<rid>".
        quota = quota_for(plan, reservation, self._clock.now())
        warnings = warnings_for(plan, reservation)
        return replace(allow, reservation_id=reservation.id, quota=quota, warnings=warnings,
                       output_reserved=want.output_tokens, output_cap=cap)  # fmt: skip

    async def _queue_for(self, policy: Policy, subject: SubjectPath, claims: Mapping[str, Any],
                         refusal: Refusal, attempt: Any) -> Reservation | None:  # fmt: skip
        if self._queue.max_depth != policy.queue.max_depth:
            self._queue.max_depth = policy.queue.max_depth
        priority = policy.queue.priority(subject, claims)
        result: Reservation | None = await self._queue.wait(
            refusal.limit.key, priority, policy.queue.max_wait_s, attempt
        )
        return result

    # -- the response path --------------------------------------------------------
    async def settle(self, reservation_id: str, usage: TokenUsage) -> bool:
        outcome = await self._ledger.settle(reservation_id, usage)
        self._queue.notify()  # a concurrency slot or an over-reservation may have freed
        return outcome.settled

    async def settle_price(self, reservation_id: str, subject: str, model: str,
                           usage: TokenUsage) -> int:  # fmt: skip
        """Cost budgets charged what the provider bills beyond the base rates
        (authz.price_settle): context tiers, cache writes, service tiers."""
        return await settle_price(self.policy, self._ledger, self.limits_for, reservation_id,
                                  subject, model, usage)  # fmt: skip

    def bounded(self, event: SettlementBound) -> None:
        """A settlement charged other than the upstream said (authz.usage.bounds): one
        warning line, and the audit trail's ``settlement_bounded`` entry."""
        log.warning("settlement bounded: %s", event.reason, extra=event.as_dict())
        notify = getattr(self._observer, "settlement_bounded", None)
        if notify is not None:
            notify(event)

    async def confirm(self, reservation_id: str, input_estimate: int, output_reserved: int) -> bool:
        """The gateway used this Check's answer (authz.confirm): hold it for ``ttl_s``.

        From the first call on, this process's Checks make tentative holds: a gateway
        with no ext_proc stream (which would never confirm) keeps full holds."""
        self.gateway_confirms = True
        return await confirm_hold(self.policy, self._ledger, self._clock, reservation_id,
                                  input_estimate, output_reserved)  # fmt: skip

    async def release(self, reservation_id: str) -> bool:
        """The request never reached the model (local reply, upstream error): charge 0."""
        return await self.settle(reservation_id, _NO_USAGE)

    async def expire_overdue(self) -> int:
        n = await self._ledger.expire(self._clock.now())
        if n:
            self._queue.notify()
        return n

    @property
    def queue_depth(self) -> int:
        return self._queue.depth

    def on_queue_wait(self, observe: Callable[[float], None]) -> None:
        """Called with each queued check's wait in seconds (admitted or not)."""
        self._queue.on_wait = observe
