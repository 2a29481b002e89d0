"""The policy as frozen values: what the loader produces and everything else reads.

Nothing here parses YAML or reads files; see :mod:`authz.policy.loader`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal
from zoneinfo import ZoneInfo

from authz.identity.settings import IdentitySettings
from authz.paths import PathRule
from authz.policy.access import ModelAccess
from authz.policy.admission import Pricing, QueuePolicy, Rate, Schedule, matches
from authz.policy.bounds import BoundsSettings
from authz.policy.directory import DirectorySettings
from authz.policy.ledger_settings import BreakerSettings
from authz.policy.management import ManagementPolicy
from authz.policy.observability import AlertPolicy, AuditPolicy
from authz.recent import Recent
from authz.usage.types import TokenUsage

__all__ = [
    "HIERARCHY",
    "LEAF_LEVELS",
    "Budget",
    "LevelRule",
    "ModelPolicy",
    "ModelRule",
    "Node",
    "Period",
    "Policy",
    "RequestPolicy",
    "ReservationPolicy",
    "SubjectPath",
    "SubjectRules",
    "Weights",
]

# Levels above the leaf, in order; the leaf is a user or an app.
HIERARCHY: tuple[str, ...] = ("org", "department", "team")
LEAF_LEVELS: tuple[str, ...] = ("user", "app")
LEVELS: tuple[str, ...] = HIERARCHY + LEAF_LEVELS
Period = Literal["hour", "day", "week", "month"]
PERIODS: tuple[str, ...] = ("hour", "day", "week", "month")


@dataclass(frozen=True, slots=True)
class Node:
    level: str
    name: str


@dataclass(frozen=True, slots=True)
class SubjectPath:
    """Where a caller sits: org, then optionally department and team, then a user or app."""

    nodes: tuple[Node, ...]

    def get(self, level: str) -> str | None:
        for node in self.nodes:
            if node.level == level:
                return node.name
        return None

    @property
    def org(self) -> str:
        return self.nodes[0].name if self.nodes else ""

    @property
    def leaf(self) -> Node | None:
        return self.nodes[-1] if self.nodes else None

    def prefix_key(self, level: str) -> str | None:
        """A stable id of the node at ``level`` (its whole ancestry), or None if absent."""
        parts = []
        for node in self.nodes:
            parts.append(f"{node.level}:{node.name}")
            if node.level == level:
                return "/".join(parts)
        return None

    def __str__(self) -> str:
        return "/".join(f"{n.level}:{n.name}" for n in self.nodes)


@dataclass(frozen=True, slots=True)
class LevelRule:
    """How one level of the path is read from the claims."""

    level: str
    claims: tuple[str, ...]  # the first claim present wins
    pattern: re.Pattern[str] | None = None  # list/str claims: the first value matching
    missing: Literal["deny", "skip", "fallback"] = "deny"
    fallback: str | None = None
    require: tuple[tuple[str, str], ...] = ()  # leaf candidates: claim == value


@dataclass(frozen=True, slots=True)
class SubjectRules:
    levels: tuple[LevelRule, ...]  # org, department, team (those configured)
    leaf: tuple[LevelRule, ...]  # candidates in order: the first that resolves wins
    leaf_required: bool = True


@dataclass(frozen=True, slots=True)
class Weights:
    """How tokens of each kind count against a budget (output is often costlier)."""

    input: float = 1.0
    cached_input: float = 1.0
    output: float = 1.0

    def units(self, usage: TokenUsage) -> int:
        # Rounded up: a fraction of a unit is still spent.
        raw = (
            usage.input_tokens * self.input
            + usage.cached_input_tokens * self.cached_input
            + usage.output_tokens * self.output
        )
        return math.ceil(raw - 1e-9)


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    match: tuple[tuple[str, str], ...]  # (level, exact name or "*")
    level: str  # the deepest level named: the node the budget is counted on
    tokens: int
    period: Period
    weights: Weights
    specificity: int  # how many exact (non-"*") names the match has
    unit: Literal["tokens", "cost"] = "tokens"  # cost: micro-units of the pricing currency
    soft_grace: int = 0  # units admitted past `tokens` with a warning, then hard
    burst: int = 0  # units borrowable from the next period, which opens with that debt
    # A request whose worst case does not fit: admit it with its output lowered to what
    # is left ("cap"), if at least min_output_tokens fit; or refuse it ("deny").
    over_reserve: Literal["cap", "deny"] = "cap"
    min_output_tokens: int = 256
    # Issue 16 (authz.policy.loader_budgets): the name this budget had before, whose
    # current window it continues; False: count and report, never refuse (audit only);
    # units of the last period's unused amount the next period may add (rollover).
    renamed_from: str | None = None
    enforce: bool = True
    rollover: int = 0
    # A shared group (authz.groups): claims every member has; one counter per org for
    # all of them, whatever their place in the tree (level is then "group").
    group: tuple[tuple[str, str], ...] = ()

    def applies_to(self, path: SubjectPath) -> bool:
        for level, want in self.match:
            have = path.get(level)
            if have is None or (want != "*" and want != have):
                return False
        return True


@dataclass(frozen=True, slots=True)
class ModelRule:
    pattern: str  # shell-style, e.g. "gpt-4o*"
    max_output_tokens: int  # reserved when the request names no max_tokens


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    rules: tuple[ModelRule, ...] = ()
    unknown: Literal["deny", "default"] = "deny"
    unknown_max_output_tokens: int = 0
    _memo: dict[str, ModelRule | None] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def rule_for(self, model: str | None) -> ModelRule | None:
        """The first rule whose pattern matches (memoised: asked several times per check)."""
        if model is None:
            return None
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = next((r for r in self.rules if fnmatchcase(model, r.pattern)), None)
        if len(self._memo) >= 4096:  # bounded: clients choose the model strings
            self._memo.clear()
        self._memo[model] = found
        return found

    def default_output(self, model: str | None) -> int | None:
        """The output reservation for a model with no max_tokens; None means deny."""
        rule = self.rule_for(model)
        if rule is not None:
            return rule.max_output_tokens
        return self.unknown_max_output_tokens if self.unknown == "default" else None

    def label(self, model: str | None) -> str:
        """A bounded metric label: the rule that matched, never the raw client string."""
        rule = self.rule_for(model)
        return rule.pattern if rule is not None else "other"

    def is_known(self, model: str | None) -> bool:
        return self.rule_for(model) is not None


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    bad_body: Literal["deny", "reserve"] = "deny"
    bad_body_tokens: int = 0
    # What passes without a charge (requests.unmetered); any other request that is no
    # metered API is refused (403). Parsed by authz.policy.loader_requests.
    unmetered: tuple[PathRule, ...] = (
        PathRule("GET /v1/models", "GET", ("v1", "models")),
        PathRule("GET /v1/models/*", "GET", ("v1", "models", "*")),
    )
    add_stream_usage: bool = True


@dataclass(frozen=True, slots=True)
class ReservationPolicy:
    ttl_s: float = 600.0
    # A Check's hold lives this long until the gateway's ext_proc stream confirms it
    # (authz.confirm); unconfirmed, it is released at 0. 0: holds live ttl_s at once.
    confirm_s: float = 10.0
    on_expiry: Literal["input_estimate", "reserved"] = "input_estimate"


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    timezone: ZoneInfo
    identity: IdentitySettings
    subject: SubjectRules
    budgets: tuple[Budget, ...]
    weights: Weights
    models: ModelPolicy
    requests: RequestPolicy
    reservations: ReservationPolicy
    ledger_url: str = "memory://"
    breaker: BreakerSettings = field(default_factory=BreakerSettings)  # ledger.breaker
    rates: tuple[Rate, ...] = ()
    pricing: Pricing = field(default_factory=Pricing)
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    schedule: Schedule | None = None
    audit: AuditPolicy = field(default_factory=AuditPolicy)
    alerts: AlertPolicy = field(default_factory=AlertPolicy)
    bounds: BoundsSettings = field(default_factory=BoundsSettings)  # see policy/bounds.py
    access: ModelAccess = field(default_factory=ModelAccess)  # see policy/access.py
    directory: DirectorySettings | None = None  # the org chart from LDAP (authz/directory)
    management: ManagementPolicy = field(default_factory=ManagementPolicy)  # authz/manage
    # Per-path memos (bounded, and forgotten when idle: authz.recent).
    _cache: Recent[tuple[Node, ...], tuple[Budget, ...]] = field(
        default_factory=Recent, compare=False, repr=False
    )
    _rate_cache: Recent[tuple[Node, ...], tuple[Rate, ...]] = field(
        default_factory=Recent, compare=False, repr=False
    )

    def forget_idle(self) -> int:
        """Drop per-path memos not used since the last call (the enforcer's sweep)."""
        return self._cache.rotate() + self._rate_cache.rotate()

    @property
    def has_cost_budgets(self) -> bool:
        return any(b.unit == "cost" for b in self.budgets)

    def rates_for(self, path: SubjectPath) -> tuple[Rate, ...]:
        """Rates on the path; the most specific per level and kind, as for budgets."""
        hit = self._rate_cache.get(path.nodes)
        if hit is not None:
            return hit
        found = [r for r in self.rates if matches(r.match, path)]
        best: dict[tuple[str, str], int] = {}
        for r in found:
            best[(r.level, r.kind)] = max(best.get((r.level, r.kind), -1), r.specificity)
        chosen = tuple(r for r in found if r.specificity == best[(r.level, r.kind)])
        self._rate_cache.offer(path.nodes, chosen)
        return chosen

    def budgets_for(self, path: SubjectPath) -> tuple[Budget, ...]:
        """Every budget on the caller's path.

        Among budgets on the same level with the same period, only the most specific
        apply: `{department: research}` overrides `{department: "*"}` for research.
        """
        hit = self._cache.get(path.nodes)
        if hit is not None:
            return hit
        matching = [b for b in self.budgets if b.applies_to(path)]
        best: dict[tuple[str, str, str], int] = {}
        for b in matching:
            slot = (b.level, b.period, b.unit)
            best[slot] = max(best.get(slot, -1), b.specificity)
        chosen = tuple(b for b in matching if b.specificity == best[(b.level, b.period, b.unit)])
        self._cache.offer(path.nodes, chosen)
        return chosen
