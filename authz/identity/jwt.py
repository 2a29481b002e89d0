"""Bearer JWT verification with PyJWT, and a cache of tokens already verified.

Order of checks, cheapest and most dangerous first: size, cache, header ``alg`` against
the allow-list (before any key is looked up, so ``none`` and ``HS256`` never reach key
code), key by ``kid``, signature + issuer + audience + required claims (PyJWT), then
time claims against the injected clock (PyJWT would read the system clock).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jwt

from authz.clock import Clock
from authz.errors import IdentityError
from authz.identity.jwks import KeySource
from authz.identity.settings import JwtSettings
from authz.recent import Doorkeeper

if TYPE_CHECKING:
    from jwt.types import Options

__all__ = ["CACHE_SIZE", "JwtVerifier", "looks_like_jwt"]

CACHE_SIZE = 10_000

# Compact JWS: three base64url segments. The signature may be empty so that an
# ``alg: none`` token is recognised as a JWT (and refused as one) instead of being
# mistaken for an API key.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# First match wins: subclasses (InvalidSignatureError is a DecodeError) before the
# catch-all. Messages are ours, never PyJWT's, which may quote parts of the token.
_PYJWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.InvalidSignatureError, "invalid_signature", "the token signature does not verify"),
    (jwt.InvalidAlgorithmError, "disallowed_algorithm", "the token algorithm is not allowed"),
    (jwt.InvalidKeyError, "invalid_signature", "the token key cannot verify it"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token issuer is not trusted"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token is not meant for this audience"),
    (jwt.PyJWTError, "malformed_token", "the token cannot be decoded"),
)

# (claims, deadline, deadline_is_exp, last used). A cached token needs no crypto until
# deadline; one not presented for a while is forgotten (forget_idle), whatever its exp.
_Entry = tuple[Mapping[str, Any], float, bool, float]


def looks_like_jwt(credential: str) -> bool:
    """Whether ``credential`` has the shape of a compact JWT (it may still be invalid)."""
    return _JWT_SHAPE.fullmatch(credential) is not None


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int in Python; "exp": true is not a time.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IdentityError("malformed_token", f"the token claim {name!r} is not a number")
    return float(value)


class JwtVerifier:
    """Verifies bearer JWTs against :class:`JwtSettings` and remembers the good ones.

    Returned claims are a read-only mapping shared by every request that presents the
    same token; callers must not expect a private copy.
    """

    def __init__(
        self,
        settings: JwtSettings,
        *,
        keys: KeySource,
        clock: Clock,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._cache_size = cache_size
        # A token is cached from its second presentation on: one presented once (a burst
        # of new callers) leaves no entry to pin memory after it goes (authz.recent).
        self._seen = Doorkeeper()
        self._algorithms = list(settings.algorithms)
        self._audiences = list(settings.audiences)
        self._issuers = list(settings.issuers)
        self._options: Options = {
            "require": list(settings.required_claims),
            # Time claims are checked below against the injected clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "enforce_minimum_key_length": True,
        }

    async def verify(self, token: str) -> Mapping[str, Any]:
        """The verified claims of ``token``, or ``IdentityError`` saying why not."""
        limit = self._settings.max_token_bytes
        # The first test spares encoding a huge header; the second counts bytes.
        if len(token) > limit or len(raw := token.encode("utf-8", "surrogatepass")) > limit:
            raise IdentityError("token_too_large", f"the token is larger than {limit} bytes")
        digest = hashlib.sha256(raw).digest()
        cached = self._cache_get(digest)
        if cached is not None:
            return cached
        claims = await self._verify_uncached(raw)
        self._cache_put(digest, claims)
        return claims

    def _cache_get(self, digest: bytes) -> Mapping[str, Any] | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        claims, deadline, deadline_is_exp, _ = entry
        now = self._clock.now()
        if now < deadline:
            self._cache[digest] = (claims, deadline, deadline_is_exp, now)
            self._cache.move_to_end(digest)
            return claims
        del self._cache[digest]
        if deadline_is_exp:
            raise IdentityError("expired", "the token has expired")
        return None

    def _cache_put(self, digest: bytes, claims: Mapping[str, Any]) -> None:
        if not self._seen.admit(digest):
            return
        exp = claims.get("exp")
        if exp is not None:
            deadline, deadline_is_exp = float(exp) + self._settings.leeway_s, True
        else:
            # No exp (allowed only if the policy does not require it): re-verify now
            # and then so that a key dropped from the JWKS stops being honoured.
            deadline, deadline_is_exp = self._clock.now() + self._settings.jwks_cache_s, False
        self._cache[digest] = (claims, deadline, deadline_is_exp, self._clock.now())
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def forget_idle(self, now: float, idle_s: float) -> int:
        """Forget tokens not presented for ``idle_s`` seconds; return how many. Called
        once per ``idle_s`` (the enforcer's rotation), which also rotates the doorkeeper;
        tokens it turned away since count as forgotten.

        Least recently used first (the order is the LRU order), so this stops at the
        first token used lately: O(forgotten). A fresh dict once most are gone, as a
        dict never shrinks its table by deletion.
        """
        cache, dropped = self._cache, self._seen.rotate()
        turned_away = dropped
        while cache:
            digest, entry = next(iter(cache.items()))
            if entry[3] > now - idle_s:
                break
            del cache[digest]
            dropped += 1
        if dropped - turned_away > len(cache):
            self._cache = OrderedDict(cache)
        return dropped

    def __len__(self) -> int:
        return len(self._cache)

    async def _verify_uncached(self, token: bytes) -> Mapping[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise IdentityError("malformed_token", "the token header cannot be decoded") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.algorithms:
            raise IdentityError(
                "disallowed_algorithm",
                f"the token algorithm {str(alg)[:16]!r} is not allowed "
                f"(allowed: {', '.join(self._settings.algorithms)})",
            )
        key = await self._keys.get_key(header.get("kid"), alg)
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=self._algorithms,
                audience=self._audiences,
                issuer=self._issuers,
                leeway=self._settings.leeway_s,
                options=self._options,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise IdentityError(
                "malformed_token", f"the token lacks the required claim {exc.claim!r}"
            ) from exc
        except jwt.PyJWTError as exc:
            for kind, reason, message in _PYJWT_ERRORS:
                if isinstance(exc, kind):
                    raise IdentityError(reason, message) from exc
            raise  # unreachable: the last row matches every PyJWTError
        self._check_times(payload)
        return MappingProxyType(payload)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now, leeway = self._clock.now(), self._settings.leeway_s
        exp = _number(claims, "exp")
        if exp is not None and now >= exp + leeway:
            raise IdentityError("expired", "the token has expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise IdentityError("not_yet_valid", "the token is not valid yet (nbf)")
        iat = _number(claims, "iat")
        if iat is not None and now + leeway < iat:
            raise IdentityError("not_yet_valid", "the token was issued in the future (iat)")
