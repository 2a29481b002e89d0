"""Who is calling: the first phase of a check, from request headers to verified claims.

Mapping claims to a place in the org hierarchy is the policy's job, not this module's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import httpx

from authz.clock import Clock
from authz.errors import IdentityError
from authz.identity.apikeys import ApiKeyStore
from authz.identity.jwks import JwksCache
from authz.identity.jwt import JwtVerifier, looks_like_jwt
from authz.identity.settings import IdentitySettings

__all__ = ["Authenticator", "Identity", "extract_credential"]

# Order matters only when a client sends several: OpenAI-style SDKs use Authorization,
# the Anthropic SDK x-api-key, Azure OpenAI api-key.
_KEY_HEADERS = ("x-api-key", "api-key")


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller whose credential verified: its claims and how they were established.

    ``key_name`` is the configured label of the API key (never the key), for logs.
    """

    claims: Mapping[str, Any]
    kind: Literal["jwt", "envoy_jwt_authn", "api_key"]
    key_name: str | None = None


def extract_credential(headers: Mapping[str, str]) -> str | None:
    """The credential a request presents: ``Authorization: Bearer`` first, then API key
    headers. Header names are lowercase, as Envoy sends them."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for name in _KEY_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


class Authenticator:
    """Turns a request's headers (or Envoy's verified JWT payload) into an :class:`Identity`.

    Every failure is an :class:`IdentityError` whose ``reason`` is a stable string and
    whose message never contains the credential.
    """

    def __init__(
        self, settings: IdentitySettings, *, clock: Clock, http: httpx.AsyncClient | None = None
    ) -> None:
        self._settings = settings
        self._api_keys = ApiKeyStore(settings.api_keys)
        self._jwks: JwksCache | None = None
        self._jwt: JwtVerifier | None = None
        # With envoy_jwt_authn, Envoy holds the keys; fetching them here too would only
        # add a second place for the two to disagree.
        if settings.source == "jwt" and settings.jwt is not None:
            self._jwks = JwksCache(settings.jwt, clock=clock, http=http)
            self._jwt = JwtVerifier(settings.jwt, keys=self._jwks, clock=clock)

    async def authenticate(
        self, headers: Mapping[str, str], envoy_jwt_payload: Mapping[str, Any] | None
    ) -> Identity:
        """The caller's identity, or ``IdentityError`` saying why there is none."""
        if self._settings.source == "envoy_jwt_authn" and envoy_jwt_payload:
            # Envoy's jwt_authn filter verified signature, issuer, audience and expiry;
            # its payload is trusted. With source "jwt" the same metadata is ignored:
            # trusting it was not configured.
            return Identity(MappingProxyType(dict(envoy_jwt_payload)), "envoy_jwt_authn")
        credential = extract_credential(headers)
        if credential is None:
            raise IdentityError(
                "missing_credential",
                "no credential: send Authorization: Bearer <token> or x-api-key",
            )
        if self._jwt is not None and looks_like_jwt(credential):
            return Identity(await self._jwt.verify(credential), "jwt")
        if self._jwt is not None and not self._api_keys:
            # "Unknown API key" when none can exist would send the caller looking for
            # the wrong thing.
            raise IdentityError("malformed_token", "the bearer credential is not a JWT")
        entry = self._api_keys.lookup(credential)
        return Identity(entry.claims, "api_key", key_name=entry.name)

    async def start(self) -> None:
        """Fetch a JWKS URL now, so the first checks do not wait on the IdP.

        Raises ``IdentityError("jwks_unavailable")`` if it cannot be fetched; the caller
        decides whether to serve anyway (keys are then fetched on first use).
        """
        if (
            self._jwks is not None
            and self._settings.jwt is not None
            and self._settings.jwt.jwks_url
        ):
            await self._jwks.reload()

    def forget_idle(self, now: float, idle_s: float) -> int:
        """Forget verified tokens not presented for ``idle_s`` seconds (memory follows
        activity); API keys are the policy's own, never forgotten."""
        return self._jwt.forget_idle(now, idle_s) if self._jwt is not None else 0

    async def aclose(self) -> None:
        """Stop background JWKS refreshes and close the HTTP client if we opened it."""
        if self._jwks is not None:
            await self._jwks.aclose()
