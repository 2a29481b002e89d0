"""The decision pipeline: identity -> subject -> estimate -> budgets -> ledger -> Decision.

This module knows nothing about Envoy or HTTP frameworks; :mod:`authz.envoy` converts
protocol messages to :class:`CheckInput` and :class:`Decision` back to responses.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from authz.apis import Api, api_for_path
from authz.clock import Clock
from authz.decision import Decision, DenyReason, Quota, Verdict
from authz.errors import BodyError, IdentityError, LedgerUnavailable
from authz.estimate import RequestEstimate, estimate_request
from authz.identity import Authenticator
from authz.ledger.base import Ledger, Limit, Refusal
from authz.policy.model import Policy, SubjectPath
from authz.policy.periods import PeriodWindows
from authz.policy.store import PolicyStore
from authz.policy.subject import SubjectUnmapped, map_subject
from authz.usage.types import TokenUsage

__all__ = ["CheckInput", "Enforcer"]

log = logging.getLogger("authz.enforcer")
_NO_USAGE = TokenUsage(0, 0, 0)


@dataclass(frozen=True, slots=True)
class CheckInput:
    method: str
    path: str
    headers: Mapping[str, str]  # lowercase names
    body: bytes | None
    body_truncated: bool = False
    envoy_jwt_payload: Mapping[str, Any] | None = None


def _duration(seconds: float) -> str:
    s = max(0, int(seconds + 0.999))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else (f"{m}m{s}s" if m else f"{s}s")


class Enforcer:
    def __init__(self, store: PolicyStore, ledger: Ledger, clock: Clock) -> None:
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self._policy = store.current
        self._windows = PeriodWindows(self._policy.timezone)
        self._auth = Authenticator(self._policy.identity, clock=clock)
        self._retired: list[Authenticator] = []
        self._warming: asyncio.Task[None] | None = None
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
        if policy.timezone != self._policy.timezone:
            self._windows = PeriodWindows(policy.timezone)
        self._policy = policy

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

    # -- the request path ---------------------------------------------------------
    async def check(self, req: CheckInput) -> Decision:
        policy = self._policy
        try:
            identity = await self._auth.authenticate(req.headers, req.envoy_jwt_payload)
        except IdentityError as exc:
            return Decision(Verdict.DENY, 401, DenyReason.UNAUTHENTICATED, exc.reason, str(exc))
        try:
            subject = map_subject(policy.subject, identity.claims)
        except SubjectUnmapped as exc:
            return Decision(Verdict.DENY, 403, DenyReason.SUBJECT_UNMAPPED, exc.level, str(exc))

        api = api_for_path(req.path) if req.method == "POST" else None
        if api is None:
            if policy.requests.other_paths == "allow":
                return Decision(Verdict.ALLOW, subject=subject)
            return Decision(
                Verdict.DENY,
                403,
                DenyReason.PATH_NOT_ALLOWED,
                "",
                f"{req.method} {req.path.split('?', 1)[0]} is not an allowed AI API",
                subject=subject,
            )

        estimate, bad = self._estimate(api, req)
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
        return await self._reserve(policy, subject, api, model, stream, tokens)

    def _estimate(self, api: Api, req: CheckInput) -> tuple[RequestEstimate | None, str]:
        if req.body_truncated:
            return None, "request body is larger than the gateway forwards for checking"
        try:
            return estimate_request(api, req.body or b""), ""
        except BodyError as exc:
            return None, str(exc)

    def limits_for(self, policy: Policy, subject: SubjectPath) -> tuple[Limit, ...]:
        now = self._clock.now()
        limits = []
        for b in policy.budgets_for(subject):
            node = subject.prefix_key(b.level)
            if node is None:
                continue
            start, end = self._windows.get(b.period, now)
            limits.append(
                Limit(f"{b.name}|{node}|{int(start)}", b.name, node, b.tokens, end, b.weights)
            )
        return tuple(limits)

    async def _reserve(
        self,
        policy: Policy,
        subject: SubjectPath,
        api: Api,
        model: str | None,
        stream: bool,
        tokens: TokenUsage,
    ) -> Decision:
        limits = self.limits_for(policy, subject)
        allow = Decision(
            Verdict.ALLOW,
            subject=subject,
            api=api,
            model=model,
            stream=stream,
            input_estimate=tokens.input_tokens,
            output_reserved=tokens.output_tokens,
        )
        if not limits:
            return allow
        now = self._clock.now()
        expiry = tokens
        if policy.reservations.on_expiry == "input_estimate":
            expiry = TokenUsage(tokens.input_tokens, 0, 0)
        # The org rides in the id so a clustered ledger can find the org's slot on settle.
        rid = f"{uuid.uuid4().hex}@{subject.org}"
        try:
            outcome = await self._ledger.reserve(
                rid, limits, tokens, deadline=now + policy.reservations.ttl_s, expiry_charge=expiry
            )
        except LedgerUnavailable as exc:
            log.error("ledger unavailable: %s", exc)
            msg = "the quota store is unavailable; try again shortly"
            return replace(
                allow, verdict=Verdict.DENY, status=503, reason=DenyReason.LEDGER_UNAVAILABLE,
                message=msg,
            )  # fmt: skip
        if isinstance(outcome, Refusal):
            lim = outcome.limit
            reset = max(0.0, lim.window_end - now)
            msg = (
                f"Token budget '{lim.budget}' for {lim.node} is exhausted: {outcome.remaining} of "
                f"{lim.amount} tokens left, this request needs {outcome.requested}; "
                f"resets in {_duration(reset)}."
            )
            quota = Quota(lim.budget, lim.node, lim.amount, outcome.remaining, reset)
            return replace(
                allow, verdict=Verdict.DENY, status=429, reason=DenyReason.BUDGET_EXHAUSTED,
                detail=lim.budget, message=msg, quota=quota,
            )  # fmt: skip
        # The tightest node (least left) is the one the x-ratelimit-* headers describe.
        i = min(range(len(outcome.limits)), key=outcome.remaining.__getitem__)
        lim = outcome.limits[i]
        reset = max(0.0, lim.window_end - now)
        quota = Quota(lim.budget, lim.node, lim.amount, outcome.remaining[i], reset)
        return replace(allow, reservation_id=rid, quota=quota)

    # -- the response path --------------------------------------------------------
    async def settle(self, reservation_id: str, usage: TokenUsage) -> bool:
        outcome = await self._ledger.settle(reservation_id, usage)
        return outcome.settled

    async def release(self, reservation_id: str) -> bool:
        """The request never reached the model (local reply, upstream error): charge 0."""
        return await self.settle(reservation_id, _NO_USAGE)

    async def expire_overdue(self) -> int:
        return await self._ledger.expire(self._clock.now())


def reset_header(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-tokens, e.g. ``6m0s``."""
    return _duration(seconds)
