"""Signing keys, JWKS documents and real signed JWTs, for any test suite.

    key = make_rsa_key()
    jwks = jwks_document(key)                 # serve it, or write it to a file
    token = mint(key, {"iss": ..., "aud": ..., "exp": ...})

Keys are cached per kid for the whole process: RSA generation takes tens of ms.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = ["SigningKey", "b64url", "jwks_document", "make_ec_key", "make_rsa_key", "mint"]


@dataclass
class SigningKey:
    """A private key with the kid and algorithm its tokens carry."""

    kid: str
    alg: str
    private_key: Any

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK dict, with kid, alg and use=sig."""
        public = self.private_key.public_key()
        algorithm = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk


@functools.cache
def make_rsa_key(kid: str = "rsa-1") -> SigningKey:
    """An RS256 key, 2048 bits (the same object for the same kid)."""
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@functools.cache
def make_ec_key(kid: str = "ec-1") -> SigningKey:
    """An ES256 key on P-256 (the same object for the same kid)."""
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def jwks_document(*keys: SigningKey) -> dict[str, Any]:
    """A JWKS (``{"keys": [...]}``) publishing the public halves of ``keys``."""
    return {"keys": [key.public_jwk() for key in keys]}


def mint(
    key: SigningKey,
    claims: dict[str, Any],
    *,
    headers: dict[str, Any] | None = None,
    alg: str | None = None,
) -> str:
    """A JWT signed by ``key`` with PyJWT; ``kid`` is set unless ``headers`` overrides it
    (``headers={"kid": None}`` leaves it out)."""
    merged: dict[str, Any] = {"kid": key.kid, **(headers or {})}
    if merged.get("kid") is None:
        del merged["kid"]
    return jwt.encode(claims, key.private_key, algorithm=alg or key.alg, headers=merged)


def b64url(data: bytes | dict[str, Any]) -> str:
    """Unpadded base64url of bytes, or of a dict as compact JSON: for hand-made tokens."""
    raw = json.dumps(data, separators=(",", ":")).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
