"""Who calls the management API, and what each caller may see and change.

A caller is a bearer JWT, verified by the request path's own machinery
(:class:`authz.identity.Authenticator`, with the policy's ``identity.jwt``: same
issuer, audience, JWKS), or an admin API key from ``management.admin_keys_file``
(compared by SHA-256 digest in constant time). The JWT's claims are mapped to the
caller's own path by the policy's subject rules, and each ``management.roles`` rule
whose claim holds its value grants its role over the caller's node at its ``scope``:

- ``viewer``: read nodes, budgets and allocations in the subtree;
- ``manager``, ``approver``: also add and remove allocations in the subtree, their
  active raises on one budget of one node adding up to at most ``max_tokens``;
- ``admin``: all of that without a cap. An admin key is an admin of every org.

Nothing outside a caller's subtree is ever shown: reads filter to the subtree, and a
named node outside it is 403 (an allocation id outside it is 404, as if it did not
exist). No credential, or one that does not verify: 401.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from authz.clock import Clock
from authz.errors import IdentityError
from authz.identity import Authenticator, extract_credential, looks_like_jwt
from authz.manage.model import is_within
from authz.policy.management import Role, RoleRule
from authz.policy.model import Policy
from authz.policy.subject import SubjectUnmapped, map_subject

__all__ = ["Caller", "Denied", "Grant", "ManageAuth"]

_WRITERS = ("manager", "approver", "admin")


class Denied(Exception):
    """Refused: ``status`` 401 (who are you?) or 403 (not yours); ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Grant:
    role: Role
    scope: str  # a node key; "" for every org (admin keys)
    rule: RoleRule | None = None

    def covers(self, node: str) -> bool:
        return self.scope == "" or is_within(node, self.scope)


@dataclass(frozen=True, slots=True)
class Caller:
    who: str  # "jwt:<sub>" or "key:<name>": recorded with each allocation
    grants: tuple[Grant, ...]
    path: str | None = None  # a JWT caller's own node (it may ask for quota on its path)

    def can_read(self, node: str) -> bool:
        return any(g.covers(node) for g in self.grants)

    def writer(self, node: str, yaml_amount: int) -> tuple[Grant | None, int | None]:
        """The grant that lets the caller change ``node`` with the highest cap (None: no
        cap), or (None, 0) if no grant does."""
        best: tuple[Grant | None, int | None] = (None, 0)
        for g in self.grants:
            if g.role not in _WRITERS or not g.covers(node):
                continue
            cap = g.rule.cap(yaml_amount) if g.rule is not None else None
            if cap is None:
                return g, None
            if best[0] is None or (best[1] is not None and cap > best[1]):
                best = (g, cap)
        return best

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(g.scope for g in self.grants)


def _holds(claims: Mapping[str, Any], claim: str, value: str) -> bool:
    have = claims.get(claim)
    if isinstance(have, list | tuple):
        return any(not isinstance(v, dict | list) and str(v) == value for v in have)
    return have is not None and not isinstance(have, dict | bool) and str(have) == value


class ManageAuth:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._auth: Authenticator | None = None
        self._settings: object = None
        self._old: list[Authenticator] = []

    def _authenticator(self, policy: Policy) -> Authenticator | None:
        jwt = policy.identity.jwt
        if jwt is None:
            return None
        # Bearer JWTs only: the request path's API keys are gateway credentials with
        # claims, not management ones (admin keys are management.admin_keys_file).
        settings = replace(policy.identity, source="jwt", api_keys=())
        if self._auth is None or settings != self._settings:
            if self._auth is not None:
                self._old.append(self._auth)
            self._auth, self._settings = Authenticator(settings, clock=self._clock), settings
        return self._auth

    async def caller(self, policy: Policy, headers: Mapping[str, str],
                     need_role: bool = True) -> Caller:  # fmt: skip
        credential = extract_credential(headers)
        if credential is None:
            raise Denied(401, "no credential: send Authorization: Bearer <token or admin key>")
        if not looks_like_jwt(credential):
            digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()
            name = None
            for known, key_name in policy.management.admin_keys:  # every entry, always
                if hmac.compare_digest(known, digest):
                    name = key_name
            if name is None:
                raise Denied(401, "the admin key is not recognised")
            return Caller(f"key:{name}", (Grant("admin", ""),))
        auth = self._authenticator(policy)
        if auth is None:
            raise Denied(401, "this service verifies no JWTs (the policy has no identity.jwt)")
        try:
            identity = await auth.authenticate({"authorization": f"Bearer {credential}"}, None)
            subject = map_subject(policy.subject, identity.claims)
        except IdentityError as exc:
            raise Denied(401, f"the token does not verify: {exc.reason}") from None
        except SubjectUnmapped as exc:
            raise Denied(403, f"the token names no place in the organisation: {exc}") from None
        grants = []
        for rule in policy.management.roles:
            scope = subject.prefix_key(rule.scope)
            if scope is not None and _holds(identity.claims, rule.claim, rule.value):
                grants.append(Grant(rule.role, scope, rule))
        if not grants and need_role:
            raise Denied(403, "the token carries no management role (policy management.roles)")
        return Caller(f"jwt:{subject}", tuple(grants), str(subject))

    async def aclose(self) -> None:
        for auth in [*self._old, *([self._auth] if self._auth else [])]:
            await auth.aclose()
