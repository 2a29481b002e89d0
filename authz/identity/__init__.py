"""Identity: who is calling, as a verified claims mapping.

``Authenticator.authenticate(headers, envoy_jwt_payload)`` accepts a bearer JWT verified
here against a JWKS, the JWT payload Envoy's jwt_authn filter already verified, or a
static API key. Failures are :class:`authz.errors.IdentityError` with a stable ``reason``.
"""

from authz.identity.apikeys import ApiKeyStore, hash_api_key
from authz.identity.authenticator import Authenticator, Identity, extract_credential
from authz.identity.jwks import JwksCache, KeySource
from authz.identity.jwt import JwtVerifier, looks_like_jwt
from authz.identity.settings import (
    ALLOWED_ALGORITHMS,
    ApiKeyEntry,
    IdentitySettings,
    JwtSettings,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ApiKeyEntry",
    "ApiKeyStore",
    "Authenticator",
    "Identity",
    "IdentitySettings",
    "JwksCache",
    "JwtSettings",
    "JwtVerifier",
    "KeySource",
    "extract_credential",
    "hash_api_key",
    "looks_like_jwt",
]
