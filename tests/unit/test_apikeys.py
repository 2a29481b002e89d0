"""Static API keys: found by digest, never echoed, and how they mix with JWTs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz.clock import FakeClock
from authz.errors import IdentityError
from authz.identity import (
    ApiKeyEntry,
    ApiKeyStore,
    Authenticator,
    IdentitySettings,
    JwtSettings,
    hash_api_key,
)
from tests.support.tokens import jwks_document, make_rsa_key, mint

pytestmark = pytest.mark.unit

BILLING_KEY = "sk-ant-api03-billing-0123456789abcdef"
RESEARCH_KEY = "sk-proj-research-fedcba9876543210"
ENTRIES = (
    ApiKeyEntry(
        "billing-bot", hash_api_key(BILLING_KEY), {"org_id": "acme", "client_id": "billing"}
    ),
    ApiKeyEntry("research", hash_api_key(RESEARCH_KEY), {"org_id": "acme", "team": "research"}),
)


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(IdentitySettings(api_keys=ENTRIES), clock=FakeClock())


def test_hash_is_lowercase_hex_sha256() -> None:
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": BILLING_KEY},
        {"api-key": BILLING_KEY},
        {"authorization": f"Bearer {BILLING_KEY}"},
    ],
    ids=["x-api-key", "api-key", "bearer"],
)
async def test_right_key_gives_its_claims(auth: Authenticator, headers: dict[str, str]) -> None:
    identity = await auth.authenticate(headers, None)
    assert identity.kind == "api_key"
    assert identity.key_name == "billing-bot"
    assert dict(identity.claims) == {"org_id": "acme", "client_id": "billing"}


async def test_bearer_wins_over_api_key_headers(auth: Authenticator) -> None:
    headers = {"authorization": f"Bearer {RESEARCH_KEY}", "x-api-key": BILLING_KEY}
    assert (await auth.authenticate(headers, None)).key_name == "research"


async def test_non_bearer_authorization_falls_back_to_x_api_key(auth: Authenticator) -> None:
    headers = {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": BILLING_KEY}
    assert (await auth.authenticate(headers, None)).key_name == "billing-bot"


@pytest.mark.parametrize(
    "presented", [BILLING_KEY + "x", BILLING_KEY.upper(), hash_api_key(BILLING_KEY), "zq9"]
)
async def test_wrong_key_is_unknown_and_never_echoed(auth: Authenticator, presented: str) -> None:
    with pytest.raises(IdentityError) as info:
        await auth.authenticate({"x-api-key": presented}, None)
    assert info.value.reason == "unknown_api_key"
    assert presented not in str(info.value) and presented not in repr(info.value.args)


def test_claims_are_a_read_only_copy() -> None:
    source: dict[str, Any] = {"org_id": "acme"}
    entry = ApiKeyEntry("k", hash_api_key("k"), source)
    source["org_id"] = "changed"
    assert entry.claims["org_id"] == "acme"
    with pytest.raises(TypeError):
        entry.claims["org_id"] = "evil"  # type: ignore[index]


@pytest.mark.parametrize(
    "digest", [hash_api_key("k").upper(), hash_api_key("k")[:-1], BILLING_KEY], ids=str.__len__
)
def test_entry_refuses_what_is_not_a_digest_without_echoing_it(digest: str) -> None:
    with pytest.raises(ValueError, match="sha256") as info:
        ApiKeyEntry("k", digest, {})
    assert digest not in str(info.value)


def test_store_refuses_duplicates() -> None:
    digest = hash_api_key("k")
    with pytest.raises(ValueError, match="same sha256"):
        ApiKeyStore([ApiKeyEntry("a", digest, {}), ApiKeyEntry("b", digest, {})])
    with pytest.raises(ValueError, match="used twice"):
        ApiKeyStore([ApiKeyEntry("a", digest, {}), ApiKeyEntry("a", hash_api_key("j"), {})])


# -- API keys next to JWTs ------------------------------------------------------------


def jwt_settings(tmp_path: Path) -> JwtSettings:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document(make_rsa_key())))
    return JwtSettings(issuers=("iss",), audiences=("aud",), jwks_file=str(path))


async def test_jwt_source_verifies_jwts_and_looks_up_the_rest(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = IdentitySettings(jwt=jwt_settings(tmp_path), api_keys=ENTRIES)
    auth = Authenticator(settings, clock=clock)
    token = mint(make_rsa_key(), {"iss": "iss", "aud": "aud", "exp": clock.now() + 60})
    assert (await auth.authenticate({"authorization": f"Bearer {token}"}, None)).kind == "jwt"
    assert (await auth.authenticate({"x-api-key": BILLING_KEY}, None)).kind == "api_key"
    with pytest.raises(IdentityError) as info:
        await auth.authenticate({"x-api-key": "opaque-but-wrong"}, None)
    assert info.value.reason == "unknown_api_key"


async def test_envoy_source_falls_back_to_api_keys(tmp_path: Path) -> None:
    settings = IdentitySettings(source="envoy_jwt_authn", api_keys=ENTRIES)
    auth = Authenticator(settings, clock=FakeClock())
    identity = await auth.authenticate({"x-api-key": BILLING_KEY}, None)
    assert identity.kind == "api_key" and identity.key_name == "billing-bot"
    # A JWT Envoy did not vouch for is not verified here: it is just an unknown key.
    token = mint(make_rsa_key(), {"iss": "iss", "aud": "aud"})
    with pytest.raises(IdentityError) as info:
        await auth.authenticate({"authorization": f"Bearer {token}"}, None)
    assert info.value.reason == "unknown_api_key"
    assert token not in str(info.value)
