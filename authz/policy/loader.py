"""YAML -> :class:`Policy`, validated whole at load time.

Every error names ``file:path`` and the bad value, e.g.
``policy.yaml:budgets[2].period: must be one of hour, day, week, month (got 'fortnight')``.
Unknown keys are errors too: a typo must not silently drop a budget.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from authz.errors import PolicyError
from authz.identity.settings import (
    ALLOWED_ALGORITHMS,
    ApiKeyEntry,
    IdentitySettings,
    JwtSettings,
)
from authz.ledger.redis.config import parse_redis_url, redact_url
from authz.ledger.sqlite import parse_sqlite_url
from authz.policy.bounds import parse_bounds
from authz.policy.ledger_settings import parse_breaker
from authz.policy.loader_access import parse_access
from authz.policy.loader_admission import (
    amount_or_share,
    parse_match,
    parse_pricing,
    parse_queue,
    parse_rates,
    parse_schedule,
)
from authz.policy.loader_budgets import BUDGET_KEYS, check_renames, with_budget_keys
from authz.policy.loader_caps import CAP_KEYS, with_caps
from authz.policy.loader_directory import parse_directory
from authz.policy.loader_management import parse_management
from authz.policy.loader_observability import parse_alerts, parse_audit
from authz.policy.loader_requests import parse_unmetered
from authz.policy.model import (
    HIERARCHY,
    LEAF_LEVELS,
    PERIODS,
    Budget,
    LevelRule,
    ModelPolicy,
    ModelRule,
    Policy,
    RequestPolicy,
    ReservationPolicy,
    SubjectRules,
    Weights,
)
from authz.policy.observability import AlertPolicy, AuditPolicy

__all__ = ["Reader", "load_policy", "parse_policy"]

T = TypeVar("T")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Counts are exact up to 2**53 in every ledger (Redis scripts compute in doubles).
MAX_COUNT = 2**53 - 1
# The bad value, quoted in an error: short, and never deeper than a few levels (the
# plain repr of a list nested a thousand deep would itself raise RecursionError).
_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong, _SHOW.maxlevel = 120, 120, 60, 3


class _Reader:
    """Walks the YAML tree, raising PolicyError with the file and the dotted path.

    Public as :data:`Reader`: runtime allocations (authz/manage) are validated by it too."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str, value: Any = ...) -> NoReturn:
        if value is not ...:
            try:
                shown = _SHOW.repr(value)
            except Exception:  # a subclass with its own (recursive) repr
                shown = f"a {type(value).__name__}"
            message = f"{message} (got {shown})"
        raise PolicyError(self.file, path, message)

    def mapping(
        self,
        value: Any,
        path: str,
        allowed: set[str],
        required: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.fail(path or "(top level)", "must be a mapping", value)
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown key; allowed: {', '.join(sorted(allowed))}")
        for key in sorted(required - set(value)):
            self.fail(f"{path}.{key}" if path else key, "is required")
        return cast(Mapping[str, Any], value)

    def free_mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        """A mapping whose keys are the user's own (claim names), not ours to check."""
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            self.fail(path, "must be a mapping of claim names to values", value)
        return cast(Mapping[str, Any], value)

    def string(self, value: Any, path: str, pattern: str | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, "must be a non-empty string", value)
        if pattern and not re.fullmatch(pattern, value):
            self.fail(path, f"must match {pattern}", value)
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}", value)
        return cast(str, value)

    def integer(self, value: Any, path: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(path, f"must be an integer >= {minimum}", value)
        if value > MAX_COUNT:
            self.fail(path, f"must be at most {MAX_COUNT} (2**53 - 1)", value)
        return value

    def number(self, value: Any, path: str, minimum: float = 0.0) -> float:
        # NaN compares false with everything: without isfinite it would pass any bound.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value))
            or value < minimum
        ):
            self.fail(path, f"must be a number >= {minimum}", value)
        if value > MAX_COUNT:
            self.fail(path, f"must be at most {MAX_COUNT} (2**53 - 1)", value)
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, "must be true or false", value)
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            self.fail(path, "must be a string or a non-empty list of strings", value)
        return tuple(self.string(v, f"{path}[{i}]") for i, v in enumerate(items))

    def items(self, value: Any, path: str, each: Callable[[Any, str], T]) -> tuple[T, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(path, "must be a list", value)
        return tuple(each(v, f"{path}[{i}]") for i, v in enumerate(value))


Reader = _Reader


def _identity(r: _Reader, raw: Any, base: Path) -> IdentitySettings:
    allowed = {"source", "jwt", "api_keys", "envoy_payload_key", "trust_network"}
    m = r.mapping(raw, "identity", allowed)
    source = r.choice(m.get("source", "jwt"), "identity.source", ("jwt", "envoy_jwt_authn"))
    # Only envoy_jwt_authn believes what the caller of the gRPC port says; the server
    # refuses that source without mTLS unless this says the network is trusted.
    trust = r.boolean(m.get("trust_network", False), "identity.trust_network")
    if trust and source != "envoy_jwt_authn":
        r.fail("identity.trust_network", "applies only when source is envoy_jwt_authn", trust)
    jwt = _jwt(r, m["jwt"], base) if "jwt" in m else None
    if source == "jwt" and jwt is None and not m.get("api_keys"):
        r.fail("identity.jwt", "is required when source is jwt and no api_keys are given")
    keys = r.items(m.get("api_keys"), "identity.api_keys", lambda v, p: _api_key(r, v, p))
    names = [k.name for k in keys]
    for i, name in enumerate(names):
        if names.index(name) != i:
            r.fail(f"identity.api_keys[{i}].name", "duplicate api key name", name)
    payload_key = r.string(m.get("envoy_payload_key", "jwt_payload"), "identity.envoy_payload_key")
    return IdentitySettings(
        source=cast(Any, source),
        jwt=jwt,
        envoy_payload_key=payload_key,
        api_keys=keys,
        trust_network=trust,
    )


def _jwt(r: _Reader, raw: Any, base: Path) -> JwtSettings:
    p = "identity.jwt"
    allowed = {
        "issuer",
        "audience",
        "algorithms",
        "jwks_url",
        "jwks_file",
        "leeway_s",
        "jwks_cache_s",
        "max_token_bytes",
    }
    m = r.mapping(raw, p, allowed, {"issuer", "audience"})
    if ("jwks_url" in m) == ("jwks_file" in m):
        r.fail(p, "needs exactly one of jwks_url or jwks_file")
    algs = r.strings(m.get("algorithms", ["RS256", "ES256"]), f"{p}.algorithms")
    for i, alg in enumerate(algs):
        if alg not in ALLOWED_ALGORITHMS:
            allowed_algs = ", ".join(sorted(ALLOWED_ALGORITHMS))
            r.fail(f"{p}.algorithms[{i}]", f"must be an asymmetric algorithm ({allowed_algs})", alg)
    url = r.string(m["jwks_url"], f"{p}.jwks_url", r"https?://\S+") if "jwks_url" in m else None
    file = None
    if "jwks_file" in m:
        file_path = base / r.string(m["jwks_file"], f"{p}.jwks_file")
        try:
            found = file_path.is_file()
        except OSError as exc:  # e.g. a name too long for the file system
            r.fail(f"{p}.jwks_file", f"cannot be read: {exc.strerror}", str(file_path))
        if not found:
            r.fail(f"{p}.jwks_file", "file not found", str(file_path))
        file = str(file_path)
    return JwtSettings(
        issuers=r.strings(m["issuer"], f"{p}.issuer"),
        audiences=r.strings(m["audience"], f"{p}.audience"),
        algorithms=algs,
        jwks_url=url,
        jwks_file=file,
        leeway_s=r.number(m.get("leeway_s", 30), f"{p}.leeway_s"),
        jwks_cache_s=r.number(m.get("jwks_cache_s", 300), f"{p}.jwks_cache_s", 1),
        max_token_bytes=r.integer(m.get("max_token_bytes", 8192), f"{p}.max_token_bytes", 256),
    )


def _api_key(r: _Reader, raw: Any, p: str) -> ApiKeyEntry:
    m = r.mapping(raw, p, {"name", "sha256", "claims"}, {"name", "sha256", "claims"})
    digest = r.string(m["sha256"], f"{p}.sha256")
    if not _HEX64.match(digest):
        # Never echo the value: it may be a key pasted by mistake.
        r.fail(f"{p}.sha256", "must be the lowercase hex sha256 of the key (64 characters)")
    claims = r.free_mapping(m["claims"], f"{p}.claims")
    return ApiKeyEntry(
        name=r.string(m["name"], f"{p}.name"), sha256=digest, claims=MappingProxyType(dict(claims))
    )


def _level_rule(r: _Reader, raw: Any, p: str, level: str, leaf: bool) -> LevelRule:
    allowed = {"claim", "claims", "pattern", "missing"} | ({"level", "require"} if leaf else set())
    m = r.mapping(raw, p, allowed)
    if ("claim" in m) == ("claims" in m):
        r.fail(p, "needs exactly one of claim or claims")
    claims = r.strings(m.get("claim", m.get("claims")), f"{p}.claim{'s' if 'claims' in m else ''}")
    pattern = None
    if "pattern" in m:
        text = r.string(m["pattern"], f"{p}.pattern")
        try:
            pattern = re.compile(text)
        except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}: Overflow
            r.fail(f"{p}.pattern", f"is not a valid regular expression: {exc}", text)
    missing, fallback = "deny", None
    raw_missing = m.get("missing", "deny")
    if isinstance(raw_missing, dict):
        fm = r.mapping(raw_missing, f"{p}.missing", {"fallback"}, {"fallback"})
        missing, fallback = "fallback", r.string(fm["fallback"], f"{p}.missing.fallback")
    else:
        missing = r.choice(raw_missing, f"{p}.missing", ("deny", "skip"))
    if level == "org" and missing == "skip":
        r.fail(f"{p}.missing", "org cannot be skipped: every path starts at an org", missing)
    require: tuple[tuple[str, str], ...] = ()
    if "require" in m:
        req = r.free_mapping(m["require"], f"{p}.require")
        for k, v in req.items():
            if isinstance(v, list | dict) or v is None:
                r.fail(f"{p}.require.{k}", "must be the claim's value (a string or number)", v)
        require = tuple((k, str(v)) for k, v in req.items())
    return LevelRule(level, claims, pattern, cast(Any, missing), fallback, require)


def _subject(r: _Reader, raw: Any) -> SubjectRules:
    m = r.mapping(raw, "subject", {*HIERARCHY, "leaf"}, {"org"})
    levels = tuple(
        _level_rule(r, m[level], f"subject.{level}", level, False)
        for level in HIERARCHY
        if level in m
    )

    def leaf(v: Any, p: str) -> LevelRule:
        lm = r.mapping(
            v, p, {"claim", "claims", "pattern", "missing", "level", "require"}, {"level"}
        )
        level = r.choice(lm["level"], f"{p}.level", LEAF_LEVELS)
        if "missing" in lm:
            r.fail(f"{p}.missing", "leaf candidates have no 'missing': the next candidate is tried")
        return _level_rule(r, {k: v for k, v in lm.items() if k != "level"}, p, level, True)

    return SubjectRules(levels=levels, leaf=r.items(m.get("leaf"), "subject.leaf", leaf))


def _weights(r: _Reader, raw: Any, p: str, default: Weights) -> Weights:
    m = r.mapping(raw, p, {"input", "cached_input", "output"})
    return Weights(
        input=r.number(m.get("input", default.input), f"{p}.input"),
        cached_input=r.number(m.get("cached_input", default.cached_input), f"{p}.cached_input"),
        output=r.number(m.get("output", default.output), f"{p}.output"),
    )


def _budget(r: _Reader, raw: Any, p: str, weights: Weights) -> Budget:
    m = r.mapping(
        raw,
        p,
        {"name", "match", "tokens", "cost", "period", "weights", "soft", "burst", *CAP_KEYS}
        | set(BUDGET_KEYS),
        {"name", "match", "period"},
    )
    name = r.string(m["name"], f"{p}.name", r"[A-Za-z0-9_.:-]+")
    pairs = parse_match(r, m["match"], f"{p}.match")
    if ("tokens" in m) == ("cost" in m):
        r.fail(p, "needs exactly one of tokens or cost")
    if "cost" in m:
        if "weights" in m:
            r.fail(f"{p}.weights", "a cost budget is weighted by the prices section, not weights")
        # Currency is counted in micro-units so every charge stays an integer.
        amount, unit = round(r.number(m["cost"], f"{p}.cost", 0.000001) * 1_000_000), "cost"
    else:
        amount, unit = r.integer(m["tokens"], f"{p}.tokens", 1), "tokens"
    grace = 0
    if "soft" in m:
        sm = r.mapping(m["soft"], f"{p}.soft", {"grace"}, {"grace"})
        grace = amount_or_share(r, sm["grace"], f"{p}.soft.grace", amount)
    burst = amount_or_share(r, m["burst"], f"{p}.burst", amount) if "burst" in m else 0
    return Budget(
        name=name,
        match=pairs,
        level=pairs[-1][0],
        tokens=amount,
        period=cast(Any, r.choice(m["period"], f"{p}.period", PERIODS)),
        weights=_weights(r, m["weights"], f"{p}.weights", weights) if "weights" in m else weights,
        specificity=sum(1 for _, v in pairs if v != "*"),
        unit=cast(Any, unit),
        soft_grace=grace,
        burst=burst,
    )


def _models(r: _Reader, raw: Any) -> ModelPolicy:
    m = r.mapping(raw, "models", {"rules", "unknown"})

    def rule(v: Any, p: str) -> ModelRule:
        rm = r.mapping(v, p, {"match", "max_output_tokens"}, {"match", "max_output_tokens"})
        return ModelRule(
            r.string(rm["match"], f"{p}.match"),
            r.integer(rm["max_output_tokens"], f"{p}.max_output_tokens", 1),
        )

    unknown = m.get("unknown", "deny")
    if isinstance(unknown, dict):
        um = r.mapping(unknown, "models.unknown", {"max_output_tokens"}, {"max_output_tokens"})
        tokens = r.integer(um["max_output_tokens"], "models.unknown.max_output_tokens", 1)
        return ModelPolicy(r.items(m.get("rules"), "models.rules", rule), "default", tokens)
    if unknown != "deny":
        r.fail("models.unknown", "must be deny or {max_output_tokens: N} (never free)", unknown)
    return ModelPolicy(r.items(m.get("rules"), "models.rules", rule), "deny", 0)


def _requests(r: _Reader, raw: Any) -> RequestPolicy:
    m = r.mapping(raw, "requests", {"bad_body", "other_paths", "unmetered", "add_stream_usage"})
    bad = m.get("bad_body", "deny")
    bad_mode, bad_tokens = "deny", 0
    if isinstance(bad, dict):
        bm = r.mapping(bad, "requests.bad_body", {"reserve_tokens"}, {"reserve_tokens"})
        bad_mode, bad_tokens = (
            "reserve",
            r.integer(bm["reserve_tokens"], "requests.bad_body.reserve_tokens", 1),
        )
    elif bad != "deny":
        r.fail("requests.bad_body", "must be deny or {reserve_tokens: N}", bad)
    return RequestPolicy(
        bad_body=cast(Any, bad_mode),
        bad_body_tokens=bad_tokens,
        unmetered=parse_unmetered(r, m),
        add_stream_usage=r.boolean(m.get("add_stream_usage", True), "requests.add_stream_usage"),
    )


def _reservations(r: _Reader, raw: Any) -> ReservationPolicy:
    m = r.mapping(raw, "reservations", {"ttl_s", "on_expiry", "confirm_s"})
    return ReservationPolicy(
        ttl_s=r.number(m.get("ttl_s", 600), "reservations.ttl_s", 1),
        confirm_s=r.number(m.get("confirm_s", 10), "reservations.confirm_s", 0),
        on_expiry=cast(
            Any,
            r.choice(
                m.get("on_expiry", "input_estimate"),
                "reservations.on_expiry",
                ("input_estimate", "reserved"),
            ),
        ),
    )


def parse_policy(data: Any, file: str) -> Policy:
    """Validate an already-parsed YAML document."""
    r = _Reader(file)
    top = r.mapping(
        data,
        "",
        {
            "version",
            "timezone",
            "identity",
            "subject",
            "weights",
            "budgets",
            "models",
            "requests",
            "reservations",
            "ledger",
            "rates",
            "prices",
            "queue",
            "schedule",
            "audit",
            "alerts",
            "bounds",
            "access",
            "directory",
            "management",
        },
        {"version", "identity", "subject", "budgets"},
    )
    if top["version"] != 1:
        r.fail("version", "must be 1", top["version"])
    tz_name = r.string(top.get("timezone", "UTC"), "timezone")
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long
        r.fail("timezone", "is not a known IANA timezone", tz_name)
    base = Path(file).parent
    weights = _weights(r, top.get("weights", {}), "weights", Weights())
    budgets = r.items(
        top["budgets"],
        "budgets",
        lambda v, p: with_budget_keys(
            r, v, p, weights, lambda r, v, p, w: with_caps(r, v, p, w, _budget)
        ),
    )
    seen: dict[str, int] = {}
    for i, b in enumerate(budgets):
        if b.name in seen:
            r.fail(
                f"budgets[{i}].name",
                f"duplicate budget name (also budgets[{seen[b.name]}])",
                b.name,
            )
        seen[b.name] = i
    check_renames(r, budgets)
    rates = parse_rates(r, top.get("rates"))
    for i, rate in enumerate(rates):
        if rate.name in seen:
            r.fail(
                f"rates[{i}].name",
                "duplicate name: budgets and rates share one namespace",
                rate.name,
            )
        seen[rate.name] = i
    pricing = parse_pricing(r, top.get("prices", {}))
    if any(b.unit == "cost" for b in budgets) and "prices" not in top:
        r.fail("prices", "is required when a budget has a cost")
    ledger = r.mapping(top.get("ledger", {}), "ledger", {"url", "breaker"})
    url = r.string(ledger.get("url", "memory://"), "ledger.url")
    if url.startswith("sqlite:"):
        try:
            parse_sqlite_url(url)  # the path resolves at start, against --state-dir
        except ValueError as exc:
            r.fail("ledger.url", str(exc))
    elif not url.startswith("memory://"):
        # No slot check is needed for redis+cluster: every subject path starts at its
        # org (org cannot be skipped, see _level_rule), and the Redis ledger hash-tags
        # every key with that org, so no budget path can span two cluster slots.
        try:
            parse_redis_url(url)
        except ValueError as exc:
            r.fail("ledger.url", f"{exc} (memory://, sqlite:///, redis://, rediss://"
                   " or redis+cluster://)",
                   redact_url(url))  # fmt: skip
    subject = _subject(r, top["subject"])
    directory = None
    if "directory" in top:
        directory, subject = parse_directory(r, top["directory"], base, subject)
    return Policy(
        source=file,
        timezone=tz,
        identity=_identity(r, top["identity"], base),
        subject=subject,
        budgets=budgets,
        weights=weights,
        models=_models(r, top.get("models", {})),
        requests=_requests(r, top.get("requests", {})),
        reservations=_reservations(r, top.get("reservations", {})),
        ledger_url=url,
        breaker=parse_breaker(r, ledger.get("breaker", {})),
        rates=rates,
        pricing=pricing,
        queue=parse_queue(r, top.get("queue", {})),
        schedule=parse_schedule(r, top["schedule"]) if "schedule" in top else None,
        audit=parse_audit(r, top["audit"], base) if "audit" in top else AuditPolicy(),
        alerts=parse_alerts(r, top["alerts"]) if "alerts" in top else AlertPolicy(),
        bounds=parse_bounds(r, top.get("bounds", {})),
        access=parse_access(r, top.get("access")),
        directory=directory,
        management=parse_management(r, top.get("management", {}), base),
    )


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raise :class:`PolicyError` naming file:path."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(file, "", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(file, "", f"is not UTF-8 text (byte {exc.start})") from exc
    try:
        data = yaml.safe_load(text)
    except RecursionError as exc:  # PyYAML composes nested collections recursively
        raise PolicyError(file, "", "is nested too deeply to be a policy") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "?"
        raise PolicyError(
            file, "", f"is not valid YAML at {where}: {getattr(exc, 'problem', exc)}"
        ) from exc
    return parse_policy(data, file)
