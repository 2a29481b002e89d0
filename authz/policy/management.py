"""The ``management:`` policy section as frozen values: who may use the management API.

Roles come from the caller's claims (the same JWT, verified by the same JWKS machinery
as the request path) and are scoped to the caller's own node at a level of the
hierarchy: a department head's grant covers ``org:acme/department:research`` and
everything below it, nothing beside it. Admin API keys (a file of SHA-256 digests)
are admins of every org: the operator's break-glass credential.

Parsed by :mod:`authz.policy.loader_management`; enforced by :mod:`authz.manage.roles`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ROLES", "ManagementPolicy", "Role", "RoleRule"]

Role = Literal["viewer", "manager", "approver", "admin"]
ROLES: tuple[str, ...] = ("viewer", "manager", "approver", "admin")


@dataclass(frozen=True, slots=True)
class RoleRule:
    """``role`` for a caller whose ``claim`` holds ``value`` (or lists it), over the
    caller's own node at ``scope`` (org, department or team)."""

    role: Role
    claim: str
    value: str
    scope: str
    # Managers and approvers: the most their raises on one budget of one node may add
    # up to while active, in units ("50%" of the budget's YAML amount is resolved per
    # budget: kept as a share here). None: no cap (admins).
    max_share: float | None = None
    max_units: int | None = None

    def cap(self, yaml_amount: int) -> int | None:
        """The most this grant's raises may add to a budget of ``yaml_amount``; None: no cap."""
        if self.role == "admin":
            return None
        if self.max_share is not None:
            return int(yaml_amount * self.max_share)
        return self.max_units or 0


@dataclass(frozen=True, slots=True)
class ManagementPolicy:
    roles: tuple[RoleRule, ...] = ()
    # sha256 hex digest -> key name, read from management.admin_keys_file at load time.
    admin_keys: tuple[tuple[str, str], ...] = ()
    # A quota request nobody decides moves one level up the hierarchy after this long
    # (authz/manage/requests.py).
    escalate_after_s: float = 86400.0
