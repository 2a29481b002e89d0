"""JWKS over real HTTP: a local aiohttp server plays the identity provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from authz.clock import FakeClock
from authz.errors import IdentityError
from authz.identity import Authenticator, IdentitySettings, JwksCache, JwtSettings
from tests.support.tokens import SigningKey, jwks_document, make_ec_key, make_rsa_key, mint

pytestmark = pytest.mark.integration

ISS = "https://idp.test/"
AUD = "authz"
REFETCH_S = 10.0
CACHE_S = 300.0


class Idp:
    """A JWKS endpoint whose keys, status and latency the test controls."""

    def __init__(self) -> None:
        self.keys: tuple[SigningKey, ...] = (make_rsa_key(),)
        self.status = 200
        self.requests = 0
        self.hit = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set, responses wait for it
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, _: web.Request) -> web.Response:
        self.requests += 1
        self.hit.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response(jwks_document(*self.keys))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)  # port 0: a free port
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/.well-known/jwks.json"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    server = Idp()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def auth(idp: Idp, clock: FakeClock) -> AsyncIterator[Authenticator]:
    settings = JwtSettings(
        issuers=(ISS,),
        audiences=(AUD,),
        jwks_url=idp.url,
        jwks_cache_s=CACHE_S,
        jwks_refetch_min_interval_s=REFETCH_S,
    )
    authenticator = Authenticator(IdentitySettings(jwt=settings), clock=clock)
    yield authenticator
    await authenticator.aclose()


def token(key: SigningKey, clock: FakeClock, **extra: Any) -> str:
    claims = {"iss": ISS, "aud": AUD, "exp": int(clock.now()) + 3600, "org_id": "acme", **extra}
    return mint(key, claims)


async def verify(auth: Authenticator, jwt: str) -> str:
    identity = await auth.authenticate({"authorization": f"Bearer {jwt}"}, None)
    return str(identity.claims["org_id"])


async def reason(auth: Authenticator, jwt: str) -> str:
    with pytest.raises(IdentityError) as info:
        await verify(auth, jwt)
    return info.value.reason


async def test_key_rotation_is_picked_up_on_unknown_kid(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    assert await verify(auth, token(make_rsa_key(), clock)) == "acme"
    assert idp.requests == 1
    idp.keys = (make_rsa_key(), make_rsa_key("rsa-2"), make_ec_key())
    clock.advance(REFETCH_S)
    assert await verify(auth, token(make_rsa_key("rsa-2"), clock)) == "acme"
    assert await verify(auth, token(make_ec_key(), clock)) == "acme"
    assert idp.requests == 2


async def test_unknown_kid_refetch_is_rate_limited(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    await verify(auth, token(make_rsa_key(), clock))
    stranger = make_rsa_key("stranger")
    # Within the interval of the first fetch: refused without asking the IdP.
    assert await reason(auth, token(stranger, clock, jti="1")) == "unknown_key"
    assert idp.requests == 1
    clock.advance(REFETCH_S)
    for n in range(5):  # random kids, as an attacker would send
        assert await reason(auth, mint(stranger, {}, headers={"kid": f"k{n}"})) == "unknown_key"
    assert idp.requests == 2


async def test_concurrent_misses_share_one_fetch(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    await verify(auth, token(make_rsa_key(), clock))
    idp.keys = (make_rsa_key(), make_rsa_key("rsa-2"))
    idp.gate = asyncio.Event()
    clock.advance(REFETCH_S)
    # Distinct tokens, so that none is served by the verified-token cache.
    checks = [
        asyncio.create_task(verify(auth, token(make_rsa_key("rsa-2"), clock, jti=str(n))))
        for n in range(20)
    ]
    await asyncio.wait_for(idp.hit.wait(), 5)
    idp.gate.set()
    assert await asyncio.gather(*checks) == ["acme"] * 20
    assert idp.requests == 2


async def test_server_down_with_cached_keys_still_verifies(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    await verify(auth, token(make_rsa_key(), clock, jti="before"))
    await idp.stop()
    clock.advance(CACHE_S + REFETCH_S)  # keys are stale and a refetch is due
    assert await verify(auth, token(make_rsa_key(), clock, jti="after")) == "acme"
    # A token naming an unknown kid now fails as unknown, not as an outage.
    assert await reason(auth, token(make_rsa_key("rsa-2"), clock)) == "unknown_key"
    assert await verify(auth, token(make_rsa_key(), clock, jti="later")) == "acme"


async def test_error_status_keeps_the_previous_keys(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    await verify(auth, token(make_rsa_key(), clock))
    idp.status = 503
    clock.advance(REFETCH_S)
    assert await reason(auth, token(make_rsa_key("rsa-2"), clock)) == "unknown_key"
    assert idp.requests == 2
    assert await verify(auth, token(make_rsa_key(), clock, jti="again")) == "acme"


async def test_no_keys_at_all_is_jwks_unavailable_and_rate_limited(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    idp.status = 500
    assert await reason(auth, token(make_rsa_key(), clock)) == "jwks_unavailable"
    assert await reason(auth, token(make_rsa_key(), clock, jti="2")) == "jwks_unavailable"
    assert idp.requests == 1  # the second request did not hammer a failing IdP
    idp.status = 200
    clock.advance(REFETCH_S)
    assert await verify(auth, token(make_rsa_key(), clock)) == "acme"


async def test_stale_keys_are_refreshed_in_the_background(
    idp: Idp, auth: Authenticator, clock: FakeClock
) -> None:
    await verify(auth, token(make_rsa_key(), clock))
    idp.hit.clear()
    idp.keys = (make_rsa_key("rsa-2"),)  # rsa-1 retired
    clock.advance(CACHE_S)
    # Served from the keys we have; the refresh runs behind the request.
    assert await verify(auth, token(make_rsa_key(), clock, jti="stale")) == "acme"
    await asyncio.wait_for(idp.hit.wait(), 5)
    await asyncio.wait_for(_until_refreshed(auth, clock), 5)
    assert await reason(auth, token(make_rsa_key(), clock, jti="retired")) == "unknown_key"
    assert idp.requests == 2


async def _until_refreshed(auth: Authenticator, clock: FakeClock) -> None:
    # Poll the event loop, not the wall clock: the background fetch finishes in a few
    # loop turns once the server has answered.
    while True:
        try:
            await verify(auth, token(make_rsa_key("rsa-2"), clock, jti="probe"))
            return
        except IdentityError:
            await asyncio.sleep(0)


async def test_a_borrowed_http_client_is_not_closed(idp: Idp, clock: FakeClock) -> None:
    settings = JwtSettings(issuers=(ISS,), audiences=(AUD,), jwks_url=idp.url)
    async with httpx.AsyncClient() as http:
        cache = JwksCache(settings, clock=clock, http=http)
        assert (await cache.get_key("rsa-1", "RS256")).key_id == "rsa-1"
        await cache.aclose()
        assert not http.is_closed


async def test_explicit_reload_reports_failure_but_keeps_keys(idp: Idp, clock: FakeClock) -> None:
    settings = JwtSettings(issuers=(ISS,), audiences=(AUD,), jwks_url=idp.url)
    cache = JwksCache(settings, clock=clock)
    try:
        await cache.reload()
        idp.status = 502
        with pytest.raises(IdentityError) as info:
            await cache.reload()
        assert info.value.reason == "jwks_unavailable"
        assert (await cache.get_key("rsa-1", "RS256")).key_id == "rsa-1"
        assert idp.requests == 2
    finally:
        await cache.aclose()
