"""JWKS: the issuer's public keys, from a file or an HTTPS URL, selected by ``kid``.

URL keys are refreshed every ``jwks_cache_s`` in the background (a request never waits
for a routine refresh) and refetched at once when a token names an unknown ``kid`` --
the normal sign of a key rotation -- but at most once per
``jwks_refetch_min_interval_s``, so tokens with random kids cannot turn the service into
a load generator against the identity provider. Concurrent misses share one fetch. A
failed fetch keeps the keys we had: an IdP outage must not log everybody out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from jwt import PyJWK, PyJWTError

from authz.clock import Clock
from authz.errors import IdentityError
from authz.identity.settings import JwtSettings

__all__ = ["JwksCache", "KeySource"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0

# What a JWK without its own "alg" must look like to verify a given algorithm.
_FAMILY: dict[str, tuple[str, frozenset[str | None]]] = {
    **{
        a: ("RSA", frozenset({None}))
        for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    },
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}


class KeySource(Protocol):
    """Anything that finds the public key for a token's ``kid`` and ``alg``."""

    async def get_key(self, kid: str | None, alg: str | None = None) -> PyJWK:
        """The key, or ``IdentityError`` (``unknown_key``, ``disallowed_algorithm``,
        ``jwks_unavailable``)."""
        ...


@dataclass(slots=True)
class _Jwk:
    data: dict[str, Any]
    # PyJWK binds one algorithm at construction; an RSA key without "alg" may verify
    # RS256 and PS384 tokens alike, so build one PyJWK per algorithm actually used.
    built: dict[str | None, PyJWK] = field(default_factory=dict)

    @property
    def kid(self) -> str | None:
        kid = self.data.get("kid")
        return kid if isinstance(kid, str) else None

    def fits(self, alg: str) -> bool:
        declared = self.data.get("alg")
        if declared is not None:
            return bool(declared == alg)
        kty, curves = _FAMILY.get(alg, ("", frozenset()))
        return self.data.get("kty") == kty and self.data.get("crv") in curves

    def for_alg(self, alg: str | None) -> PyJWK:
        if alg not in self.built:
            self.built[alg] = PyJWK(self.data, algorithm=alg)
        return self.built[alg]


def _build(jwk: _Jwk, alg: str | None) -> PyJWK:
    try:
        return jwk.for_alg(alg)
    except PyJWTError as exc:
        raise IdentityError(
            "disallowed_algorithm", f"the token's key cannot verify algorithm {alg}"
        ) from exc


def _parse(document: object) -> tuple[_Jwk, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('a JWKS must be a JSON object with a "keys" list')
    keys: list[_Jwk] = []
    for raw in document["keys"]:
        # Symmetric keys have no business in a published key set, and encryption keys
        # must not verify signatures.
        if not isinstance(raw, dict) or raw.get("kty") == "oct" or raw.get("use") == "enc":
            continue
        jwk = _Jwk(dict(raw))
        try:
            jwk.for_alg(None)  # proves the key material is usable
        except PyJWTError as exc:
            log.warning("jwks: skipping unusable key kid=%r: %s", jwk.kid, exc)
            continue
        keys.append(jwk)
    if not keys:
        raise ValueError("the JWKS has no usable signing keys")
    return tuple(keys)


class JwksCache:
    """The JWKS named by ``JwtSettings.jwks_file`` or ``jwks_url``, as a :class:`KeySource`.

    A file is read once, here (a broken file stops start-up); :meth:`reload` re-reads it.
    """

    def __init__(
        self, settings: JwtSettings, *, clock: Clock, http: httpx.AsyncClient | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._keys: tuple[_Jwk, ...] = ()
        self._loaded_at = float("-inf")  # last successful load
        self._attempted_at = float("-inf")  # last fetch started, failed or not
        self._inflight: asyncio.Task[None] | None = None
        self._owns_http = http is None and settings.jwks_url is not None
        self._http = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) if self._owns_http else http
        if settings.jwks_file is not None:
            self._keys = self._read_file(settings.jwks_file)
            self._loaded_at = clock.now()

    async def get_key(self, kid: str | None, alg: str | None = None) -> PyJWK:
        if self._settings.jwks_url is not None:
            await self._ensure_fresh()
        if kid is None:
            return _build(self._only_key(alg), alg)
        found = self._find(kid)
        if not found and self._settings.jwks_url is not None and self._may_refetch():
            # An unreachable IdP makes this "unknown_key", not an outage: the keys we
            # have still verify every token whose kid they contain.
            with contextlib.suppress(IdentityError):
                await self._fetch_shared()
            found = self._find(kid)
        if not found:
            raise IdentityError("unknown_key", "the token's key id is not in the issuer's JWKS")
        usable = [k for k in found if alg is None or k.fits(alg)]
        if not usable:
            raise IdentityError(
                "disallowed_algorithm", f"the token's algorithm {alg} does not match its key"
            )
        return _build(usable[0], alg)

    async def reload(self) -> None:
        """Re-read the file, or fetch the URL now (not rate-limited: an operator asked).

        On failure raises ``IdentityError("jwks_unavailable")``; the old keys stay in use.
        """
        if self._settings.jwks_file is not None:
            self._keys = await asyncio.to_thread(self._read_file, self._settings.jwks_file)
            self._loaded_at = self._clock.now()
        else:
            await self._fetch_shared()

    async def aclose(self) -> None:
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if self._owns_http and self._http is not None:
            await self._http.aclose()

    def _find(self, kid: str) -> list[_Jwk]:
        return [k for k in self._keys if k.kid == kid]

    def _only_key(self, alg: str | None) -> _Jwk:
        # Without a kid, guessing among several keys would mean trying each in turn;
        # accept the token only when the choice is unambiguous.
        candidates = [k for k in self._keys if alg is None or k.fits(alg)]
        if len(candidates) != 1:
            raise IdentityError(
                "unknown_key",
                f"the token has no key id and the JWKS has {len(candidates)} keys for {alg}",
            )
        return candidates[0]

    def _may_refetch(self) -> bool:
        if self._inflight is not None:
            return True  # joining a fetch already under way costs the IdP nothing
        elapsed = self._clock.now() - self._attempted_at
        return elapsed >= self._settings.jwks_refetch_min_interval_s

    async def _ensure_fresh(self) -> None:
        if not self._keys:
            # Rate-limited too: while the IdP is down, each request must not open a new
            # connection and wait out the timeout.
            if not self._may_refetch():
                raise IdentityError("jwks_unavailable", "the issuer's JWKS is not available")
            await self._fetch_shared()
        elif (
            self._clock.now() - self._loaded_at >= self._settings.jwks_cache_s
            and self._inflight is None
            and self._may_refetch()
        ):
            self._start_fetch()  # in the background: the current keys still serve

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._attempted_at = self._clock.now()
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._fetch_done)
            self._inflight = task
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "jwks: fetch failed, keeping %d keys: %s", len(self._keys), task.exception()
            )

    async def _fetch_shared(self) -> None:
        # shield: a request cancelled mid-wait must not cancel the fetch others await.
        try:
            await asyncio.shield(self._start_fetch())
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            raise IdentityError(
                "jwks_unavailable", f"the issuer's JWKS could not be fetched: {exc}"
            ) from exc

    async def _fetch(self) -> None:
        assert self._http is not None and self._settings.jwks_url is not None
        response = await self._http.get(self._settings.jwks_url, timeout=FETCH_TIMEOUT_S)
        response.raise_for_status()
        self._keys = _parse(response.json())
        self._loaded_at = self._clock.now()

    @staticmethod
    def _read_file(path: str) -> tuple[_Jwk, ...]:
        try:
            with open(path, encoding="utf-8") as f:
                return _parse(json.load(f))
        except (OSError, ValueError) as exc:
            raise IdentityError("jwks_unavailable", f"{path}: {exc}") from exc
