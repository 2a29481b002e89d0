"""Identity settings: frozen values built by the policy loader.

The loader validates field values and reports them with ``file:path``; the checks here
are the few invariants whose violation would be a security hole rather than a typo
(an algorithm that enables key confusion, an ambiguous key source), so they hold even
for settings built in code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ApiKeyEntry",
    "IdentitySettings",
    "JwtSettings",
]

# Asymmetric algorithms only. "none" needs no key at all, and HS* would let a token
# signed with a *public* key (published in the JWKS) used as an HMAC secret pass.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _str_tuple(field: str, value: object) -> tuple[str, ...]:
    # A bare string would be iterated character by character ("abc" -> "a", "b", "c"),
    # silently accepting issuers nobody configured.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{field} must be a sequence of strings (got {value!r})")
    items = tuple(value)
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"{field} must be a sequence of strings (got {value!r})")
    return items


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How to verify bearer JWTs: who may issue them, for whom, signed how, keys where."""

    issuers: tuple[str, ...]
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwks_url: str | None = None
    jwks_file: str | None = None
    leeway_s: float = 30.0
    jwks_cache_s: float = 300.0
    jwks_refetch_min_interval_s: float = 10.0
    max_token_bytes: int = 8192
    required_claims: tuple[str, ...] = ("exp", "iss", "aud")

    def __post_init__(self) -> None:
        for name in ("issuers", "audiences", "algorithms", "required_claims"):
            object.__setattr__(self, name, _str_tuple(name, getattr(self, name)))
        if not self.algorithms:
            raise ValueError("algorithms must not be empty")
        bad = sorted(set(self.algorithms) - ALLOWED_ALGORITHMS)
        if bad:
            raise ValueError(
                f"algorithms not allowed: {', '.join(bad)} "
                f"(allowed: {', '.join(sorted(ALLOWED_ALGORITHMS))})"
            )
        # Empty lists would make PyJWT reject every token (audience) or, worse, let a
        # caller believe issuers are checked when they are not.
        if not self.issuers:
            raise ValueError("issuers must not be empty")
        if not self.audiences:
            raise ValueError("audiences must not be empty")
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("exactly one of jwks_url and jwks_file must be set")


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    """A static API key, stored only as the SHA-256 of the key, and the claims it stands for."""

    name: str
    sha256: str
    claims: Mapping[str, Any]

    def __post_init__(self) -> None:
        # Never echo the value: an operator may have pasted the key itself here.
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(f"api key {self.name!r}: sha256 must be 64 lowercase hex characters")
        # A private copy, read-only: the same mapping is handed to every request.
        object.__setattr__(self, "claims", MappingProxyType(dict(self.claims)))


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    """Where the caller's identity comes from.

    ``source="jwt"`` verifies bearer JWTs here; ``"envoy_jwt_authn"`` trusts the payload
    that Envoy's jwt_authn filter already verified (found in its dynamic metadata under
    ``envoy_payload_key``). API keys are accepted with either source.
    """

    source: Literal["jwt", "envoy_jwt_authn"] = "jwt"
    jwt: JwtSettings | None = None
    envoy_payload_key: str = "jwt_payload"
    api_keys: tuple[ApiKeyEntry, ...] = ()
    # envoy_jwt_authn takes any caller of the gRPC port at its word: without mTLS (only
    # the gateway holds a client certificate) the server refuses to start with it unless
    # the operator states here that the network already authenticates callers (a mesh).
    trust_network: bool = False
