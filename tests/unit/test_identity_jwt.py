"""JWT verification: every way a token can be wrong, the leeway edges, the cache."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from jwt import PyJWK

from authz.clock import FakeClock
from authz.errors import IdentityError
from authz.identity import (
    Authenticator,
    IdentitySettings,
    JwksCache,
    JwtSettings,
    JwtVerifier,
    looks_like_jwt,
)
from tests.support.tokens import (
    SigningKey,
    b64url,
    make_ec_key,
    make_rsa_key,
    mint,
)

pytestmark = pytest.mark.unit

ISS = "https://idp.example.com/"
AUD = "authz"
LEEWAY = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def claims(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "org_id": "acme",
        "iat": int(clock.now()),
        "exp": int(clock.now()) + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def write_jwks(path: Path, *keys: SigningKey | dict[str, Any]) -> str:
    docs = [k.public_jwk() if isinstance(k, SigningKey) else k for k in keys]
    path.write_text(json.dumps({"keys": docs}))
    return str(path)


def settings_for(jwks_file: str, **overrides: Any) -> JwtSettings:
    fields: dict[str, Any] = {"issuers": (ISS,), "audiences": (AUD, "other"), "leeway_s": LEEWAY}
    fields.update(overrides)
    return JwtSettings(jwks_file=jwks_file, **fields)


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    return write_jwks(tmp_path / "jwks.json", make_rsa_key(), make_ec_key())


@pytest.fixture
def auth(jwks_file: str, clock: FakeClock) -> Authenticator:
    return Authenticator(IdentitySettings(jwt=settings_for(jwks_file)), clock=clock)


async def authenticate(auth: Authenticator, token: str) -> Mapping[str, Any]:
    identity = await auth.authenticate({"authorization": f"Bearer {token}"}, None)
    assert identity.kind == "jwt"
    return identity.claims


async def refused(auth: Authenticator, token: str, reason: str) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        await authenticate(auth, token)
    assert info.value.reason == reason, str(info.value)
    # Neither the token nor its signature may leak into logs or the 401 body.
    for secret in {token, token.rsplit(".", 1)[-1]} - {""}:
        assert secret not in str(info.value)
    return info.value


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(header)}.{b64url(payload)}.{b64url(signature)}"


class CountingKeys:
    """A KeySource that counts lookups: a lookup is what a cache hit must avoid."""

    def __init__(self, inner: JwksCache) -> None:
        self.inner = inner
        self.calls = 0

    async def get_key(self, kid: str | None, alg: str | None = None) -> PyJWK:
        self.calls += 1
        return await self.inner.get_key(kid, alg)


# -- accepted tokens ------------------------------------------------------------------


@pytest.mark.parametrize("key", [make_rsa_key(), make_ec_key()], ids=["RS256", "ES256"])
async def test_valid_token_passes(auth: Authenticator, clock: FakeClock, key: SigningKey) -> None:
    got = await authenticate(auth, mint(key, claims(clock)))
    assert got["org_id"] == "acme" and got["sub"] == "user-1"


async def test_bearer_scheme_is_case_insensitive(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key(), claims(clock))
    identity = await auth.authenticate({"authorization": f"bEaReR  {token} "}, None)
    assert identity.claims["org_id"] == "acme"


async def test_audience_list_matches_any(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key(), claims(clock, aud=["someone-else", AUD]))
    assert (await authenticate(auth, token))["aud"] == ["someone-else", AUD]


async def test_claims_are_read_only(auth: Authenticator, clock: FakeClock) -> None:
    got = await authenticate(auth, mint(make_rsa_key(), claims(clock)))
    with pytest.raises(TypeError):
        got["org_id"] = "evil"  # type: ignore[index]


async def test_key_without_alg_verifies_each_allowed_algorithm_of_its_type(
    tmp_path: Path, clock: FakeClock
) -> None:
    key = make_rsa_key()
    jwk = {k: v for k, v in key.public_jwk().items() if k != "alg"}
    path = write_jwks(tmp_path / "jwks.json", jwk)
    settings = settings_for(path, algorithms=("RS256", "PS384"))
    auth = Authenticator(IdentitySettings(jwt=settings), clock=clock)
    for alg in ("RS256", "PS384"):
        assert (await authenticate(auth, mint(key, claims(clock, jti=alg), alg=alg)))["jti"] == alg


async def test_token_without_kid_uses_the_only_key_of_its_type(
    auth: Authenticator, clock: FakeClock
) -> None:
    # The JWKS holds one RSA and one EC key: the alg alone picks one.
    token = mint(make_rsa_key(), claims(clock), headers={"kid": None})
    assert "kid" not in jwt.get_unverified_header(token)
    assert (await authenticate(auth, token))["org_id"] == "acme"


async def test_token_without_kid_is_refused_when_the_choice_is_ambiguous(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = write_jwks(tmp_path / "jwks.json", make_rsa_key(), make_rsa_key("rsa-2"))
    auth = Authenticator(IdentitySettings(jwt=settings_for(path)), clock=clock)
    await refused(auth, mint(make_rsa_key(), claims(clock), headers={"kid": None}), "unknown_key")


# -- refused tokens -------------------------------------------------------------------


async def test_expired(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key(), claims(clock, exp=int(clock.now()) - 3600))
    await refused(auth, token, "expired")


async def test_not_yet_valid(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key(), claims(clock, nbf=int(clock.now()) + 3600))
    await refused(auth, token, "not_yet_valid")


async def test_issued_in_the_future(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key(), claims(clock, iat=int(clock.now()) + 3600))
    await refused(auth, token, "not_yet_valid")


@pytest.mark.parametrize(
    ("offset", "ok"),
    [(-LEEWAY + 1, True), (-LEEWAY, False), (-LEEWAY - 1, False)],
    ids=["inside", "edge", "outside"],
)
async def test_exp_leeway_edges(
    auth: Authenticator, clock: FakeClock, offset: float, ok: bool
) -> None:
    token = mint(make_rsa_key(), claims(clock, exp=int(clock.now() + offset)))
    if ok:
        await authenticate(auth, token)
    else:
        await refused(auth, token, "expired")


@pytest.mark.parametrize(
    ("offset", "ok"), [(LEEWAY, True), (LEEWAY + 1, False)], ids=["edge", "outside"]
)
async def test_nbf_leeway_edges(
    auth: Authenticator, clock: FakeClock, offset: float, ok: bool
) -> None:
    token = mint(make_rsa_key(), claims(clock, nbf=int(clock.now() + offset)))
    if ok:
        await authenticate(auth, token)
    else:
        await refused(auth, token, "not_yet_valid")


async def test_wrong_issuer(auth: Authenticator, clock: FakeClock) -> None:
    await refused(auth, mint(make_rsa_key(), claims(clock, iss="https://evil/")), "wrong_issuer")


async def test_wrong_audience(auth: Authenticator, clock: FakeClock) -> None:
    await refused(auth, mint(make_rsa_key(), claims(clock, aud="billing")), "wrong_audience")


@pytest.mark.parametrize("missing", ["exp", "iss", "aud"])
async def test_required_claim_missing(auth: Authenticator, clock: FakeClock, missing: str) -> None:
    err = await refused(
        auth, mint(make_rsa_key(), claims(clock, **{missing: None})), "malformed_token"
    )
    assert missing in str(err)


async def test_exp_that_is_not_a_number(auth: Authenticator, clock: FakeClock) -> None:
    await refused(auth, mint(make_rsa_key(), claims(clock, exp=True)), "malformed_token")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_refused(auth: Authenticator, clock: FakeClock, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims(clock))
    assert token.endswith(".")
    await refused(auth, token, "disallowed_algorithm")


def hs256_with_public_key(key: SigningKey, payload: dict[str, Any]) -> tuple[str, bytes]:
    """The classic key-confusion forgery: HMAC keyed with the published public key."""
    pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64url({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}.{b64url(payload)}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}", pem


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    auth: Authenticator, clock: FakeClock
) -> None:
    token, _ = hs256_with_public_key(make_rsa_key(), claims(clock))
    await refused(auth, token, "disallowed_algorithm")


def test_pyjwt_itself_refuses_hs256_with_an_rsa_key(clock: FakeClock) -> None:
    # Defence in depth, should an allow-list ever let HS256 through: the JWK is bound to
    # RS256, and a PEM public key is never accepted as an HMAC secret.
    key = make_rsa_key()
    token, pem = hs256_with_public_key(key, claims(clock))
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, key=PyJWK(key.public_jwk()), algorithms=["HS256", "RS256"], audience=AUD)
    with pytest.raises(jwt.InvalidKeyError):
        jwt.decode(token, key=pem, algorithms=["HS256"], audience=AUD)


async def test_alg_not_matching_the_key_type_is_refused(
    auth: Authenticator, clock: FakeClock
) -> None:
    # A real ES256 signature, but pointing at the RSA key.
    token = mint(make_ec_key(), claims(clock), headers={"kid": "rsa-1"})
    await refused(auth, token, "disallowed_algorithm")


async def test_alg_allowed_but_not_configured_is_refused(
    auth: Authenticator, clock: FakeClock
) -> None:
    await refused(auth, mint(make_rsa_key(), claims(clock), alg="RS512"), "disallowed_algorithm")


async def test_unknown_kid(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key("not-published"), claims(clock))
    await refused(auth, token, "unknown_key")


async def test_signature_by_another_key_with_a_published_kid(
    auth: Authenticator, clock: FakeClock
) -> None:
    token = mint(make_rsa_key("impostor"), claims(clock), headers={"kid": "rsa-1"})
    await refused(auth, token, "invalid_signature")


async def test_tampered_payload(auth: Authenticator, clock: FakeClock) -> None:
    header, _, signature = mint(make_rsa_key(), claims(clock)).split(".")
    token = f"{header}.{b64url(claims(clock, org_id='someone-else'))}.{signature}"
    await refused(auth, token, "invalid_signature")


@pytest.mark.parametrize(
    "token",
    ["aaaa.bbbb.cccc", f"{b64url(b'[1]')}.{b64url(b'{}')}.c2ln", "eyJhbGciOiJSUzI1NiJ9.!!!.x"],
    ids=["not-json", "header-not-object", "bad-base64"],
)
async def test_garbage(auth: Authenticator, token: str) -> None:
    await refused(auth, token, "malformed_token")


async def test_non_jwt_bearer_without_api_keys(auth: Authenticator) -> None:
    await refused(auth, "just-some-opaque-string", "malformed_token")


async def test_payload_that_is_not_json(auth: Authenticator) -> None:
    key = make_rsa_key()
    header = b64url({"alg": "RS256", "kid": key.kid})
    body = b64url(b"not json")
    signature = jwt.get_algorithm_by_name("RS256").sign(
        f"{header}.{body}".encode(), key.private_key
    )
    await refused(auth, f"{header}.{body}.{b64url(signature)}", "malformed_token")


async def test_oversized_token(auth: Authenticator, clock: FakeClock) -> None:
    token = mint(make_rsa_key(), claims(clock, pad="x" * 9000))
    await refused(auth, token, "token_too_large")


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer   "}],
    ids=["none", "basic", "empty-bearer"],
)
async def test_missing_credential(auth: Authenticator, headers: dict[str, str]) -> None:
    with pytest.raises(IdentityError) as info:
        await auth.authenticate(headers, None)
    assert info.value.reason == "missing_credential"


def test_jwt_shape() -> None:
    assert looks_like_jwt("a.b.c") and looks_like_jwt("a.b.")
    assert not looks_like_jwt("sk-ant-api03-abc") and not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a..c") and not looks_like_jwt("a.b c.d")


# -- the verified-token cache ---------------------------------------------------------


def counting_verifier(
    jwks_file: str, clock: FakeClock, cache_size: int = 100
) -> tuple[JwtVerifier, CountingKeys]:
    settings = settings_for(jwks_file)
    keys = CountingKeys(JwksCache(settings, clock=clock))
    return JwtVerifier(settings, keys=keys, clock=clock, cache_size=cache_size), keys


async def test_cache_hit_skips_verification(jwks_file: str, clock: FakeClock) -> None:
    verifier, keys = counting_verifier(jwks_file, clock)
    token = mint(make_rsa_key(), claims(clock))
    await verifier.verify(token)  # seen once: verified, not kept (a one-off caller)
    assert len(verifier) == 0
    second = await verifier.verify(token)  # back: verified again, and kept
    assert await verifier.verify(token) is second
    assert keys.calls == 2


async def test_cache_hit_expires_with_the_token(jwks_file: str, clock: FakeClock) -> None:
    verifier, keys = counting_verifier(jwks_file, clock)
    token = mint(make_rsa_key(), claims(clock, exp=int(clock.now()) + 60))
    await verifier.verify(token)
    await verifier.verify(token)  # the second presentation is cached
    clock.advance(60 + LEEWAY - 1)
    await verifier.verify(token)
    clock.advance(1)
    with pytest.raises(IdentityError) as info:
        await verifier.verify(token)
    assert info.value.reason == "expired"
    assert keys.calls == 2  # the cached exp was enough to refuse it


async def test_cache_is_bounded_and_evicts_least_recently_used(
    jwks_file: str, clock: FakeClock
) -> None:
    verifier, keys = counting_verifier(jwks_file, clock, cache_size=2)
    a, b, c = (mint(make_rsa_key(), claims(clock, jti=j)) for j in "abc")
    for token in (a, a, b, b):  # each kept from its second presentation
        await verifier.verify(token)
    await verifier.verify(a)  # a is now the most recently used
    await verifier.verify(c)
    await verifier.verify(c)  # kept: evicts b
    assert keys.calls == 6
    await verifier.verify(a)
    assert keys.calls == 6
    await verifier.verify(b)
    assert keys.calls == 7


async def test_refused_tokens_are_not_cached(jwks_file: str, clock: FakeClock) -> None:
    verifier, keys = counting_verifier(jwks_file, clock)
    token = mint(make_rsa_key(), claims(clock, nbf=int(clock.now()) + 120))
    with pytest.raises(IdentityError):
        await verifier.verify(token)
    clock.advance(120)
    assert (await verifier.verify(token))["org_id"] == "acme"
    assert keys.calls == 2


async def test_token_without_exp_is_reverified_after_the_jwks_period(
    jwks_file: str, clock: FakeClock
) -> None:
    settings = settings_for(jwks_file, required_claims=("iss", "aud"))
    keys = CountingKeys(JwksCache(settings, clock=clock))
    verifier = JwtVerifier(settings, keys=keys, clock=clock)
    token = mint(make_rsa_key(), claims(clock, exp=None))
    for _ in range(3):  # verified twice (kept from the second), then a cache hit
        await verifier.verify(token)
    assert keys.calls == 2
    clock.advance(settings.jwks_cache_s)
    await verifier.verify(token)
    assert keys.calls == 3


@pytest.mark.parametrize("alg", ["none", "HS256", "RS512"])
async def test_disallowed_alg_is_refused_before_any_key_lookup(
    jwks_file: str, clock: FakeClock, alg: str
) -> None:
    verifier, keys = counting_verifier(jwks_file, clock)
    with pytest.raises(IdentityError) as info:
        await verifier.verify(forge({"alg": alg, "kid": "rsa-1"}, claims(clock), b"sig"))
    assert info.value.reason == "disallowed_algorithm"
    assert keys.calls == 0


# -- JWKS from a file -----------------------------------------------------------------


async def test_jwks_file_reload_picks_up_a_new_key(tmp_path: Path, clock: FakeClock) -> None:
    path = write_jwks(tmp_path / "jwks.json", make_rsa_key())
    cache = JwksCache(settings_for(path), clock=clock)
    with pytest.raises(IdentityError) as info:
        await cache.get_key("rsa-2", "RS256")
    assert info.value.reason == "unknown_key"
    write_jwks(tmp_path / "jwks.json", make_rsa_key(), make_rsa_key("rsa-2"))
    await cache.reload()
    assert (await cache.get_key("rsa-2", "RS256")).key_id == "rsa-2"


async def test_failed_jwks_file_reload_keeps_the_old_keys(tmp_path: Path, clock: FakeClock) -> None:
    path = write_jwks(tmp_path / "jwks.json", make_rsa_key())
    cache = JwksCache(settings_for(path), clock=clock)
    (tmp_path / "jwks.json").write_text("{not json")
    with pytest.raises(IdentityError) as info:
        await cache.reload()
    assert info.value.reason == "jwks_unavailable" and path in str(info.value)
    assert (await cache.get_key("rsa-1", "RS256")).key_id == "rsa-1"


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"keys": []}', '{"nokeys": 1}', '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'],
)
def test_bad_jwks_file_stops_start_up(tmp_path: Path, clock: FakeClock, content: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(IdentityError) as info:
        JwksCache(settings_for(str(path)), clock=clock)
    assert info.value.reason == "jwks_unavailable" and str(path) in str(info.value)


async def test_symmetric_and_encryption_keys_are_ignored(tmp_path: Path, clock: FakeClock) -> None:
    enc = {**make_ec_key("ec-enc").public_jwk(), "use": "enc"}
    path = write_jwks(
        tmp_path / "jwks.json", make_rsa_key(), {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}, enc
    )
    cache = JwksCache(settings_for(path), clock=clock)
    for kid in ("hmac", "ec-enc"):
        with pytest.raises(IdentityError) as info:
            await cache.get_key(kid)
        assert info.value.reason == "unknown_key"


# -- settings and sources -------------------------------------------------------------


@pytest.mark.parametrize("algorithms", [("none",), ("HS256",), ("RS256", "HS512"), ()])
def test_settings_refuse_dangerous_algorithms(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="algorithms"):
        JwtSettings(issuers=(ISS,), audiences=(AUD,), algorithms=algorithms, jwks_file="j")


@pytest.mark.parametrize(
    "sources", [{}, {"jwks_file": "j", "jwks_url": "https://idp/jwks"}], ids=["neither", "both"]
)
def test_settings_need_exactly_one_jwks_source(sources: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JwtSettings(issuers=(ISS,), audiences=(AUD,), **sources)


def test_settings_refuse_a_bare_string_for_a_list() -> None:
    with pytest.raises(ValueError, match="issuers"):
        JwtSettings(issuers=ISS, audiences=(AUD,), jwks_file="j")  # type: ignore[arg-type]


async def test_envoy_source_trusts_envoys_payload(clock: FakeClock) -> None:
    auth = Authenticator(IdentitySettings(source="envoy_jwt_authn"), clock=clock)
    identity = await auth.authenticate({}, {"sub": "u", "org_id": "acme"})
    assert identity.kind == "envoy_jwt_authn" and dict(identity.claims) == {
        "sub": "u",
        "org_id": "acme",
    }
    with pytest.raises(IdentityError) as info:
        await auth.authenticate({}, None)
    assert info.value.reason == "missing_credential"


async def test_jwt_source_ignores_envoy_metadata(auth: Authenticator) -> None:
    with pytest.raises(IdentityError) as info:
        await auth.authenticate({}, {"sub": "u", "org_id": "acme"})
    assert info.value.reason == "missing_credential"
