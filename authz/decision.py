"""Decisions are values: what the enforcer says, before any protocol gets involved."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from authz.apis import Api
from authz.policy.model import SubjectPath

__all__ = ["Decision", "DenyReason", "Quota", "Verdict"]


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class DenyReason(StrEnum):
    """Stable strings: used as the error code, a log field and a metric label."""

    BUDGET_EXHAUSTED = "budget_exhausted"
    RATE_LIMITED = "rate_limited"
    OFF_PEAK = "off_peak"
    UNAUTHENTICATED = "unauthenticated"
    SUBJECT_UNMAPPED = "subject_unmapped"
    UNKNOWN_MODEL = "unknown_model"
    BAD_REQUEST = "bad_request"
    PATH_NOT_ALLOWED = "path_not_allowed"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    MODEL_NOT_ALLOWED = "model_not_allowed"  # the node's access list (policy/access.py)
    DIRECTORY_UNAVAILABLE = "directory_unavailable"  # authz/directory, on_down
    NODE_FROZEN = "node_frozen"  # a runtime freeze (authz/manage) on the caller's path


@dataclass(frozen=True, slots=True)
class Quota:
    """The tightest budget on the path: what the x-ratelimit-* headers report."""

    budget: str
    node: str
    limit: int
    remaining: int
    reset_after_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    status: int = 200  # HTTP status the client gets on deny
    reason: DenyReason | None = None
    detail: str = ""  # finer machine code, e.g. the identity failure ("expired")
    message: str = ""  # human text for the client; never contains credentials
    subject: SubjectPath | None = None
    api: Api | None = None
    model: str | None = None
    stream: bool = False
    reservation_id: str | None = None
    input_estimate: int = 0
    output_reserved: int = 0
    quota: Quota | None = None
    retry_after_s: float | None = None  # denials: when trying again can succeed
    warnings: tuple[str, ...] = ()  # allowed, but a soft budget is past its amount
    output_cap: int | None = None  # allowed with the output limit lowered to this (per choice)

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW
