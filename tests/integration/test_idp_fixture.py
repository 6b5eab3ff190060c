"""The test OpenID Provider (tests/idp/server.js) does what the gateway's tests rely on."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.idp import (
    CLIENT_SECRET,
    DEFAULT_SCOPES,
    IdpError,
    OidcProviderProcess,
    complete_login,
    complete_logout,
    default_idp_config,
    make_client_key,
)

pytestmark = pytest.mark.integration

RP = "http://127.0.0.1:9"  # never contacted: the tests stop at the redirect to it
REDIRECT_URI = f"{RP}/auth/callback"
ACCESS_TOKEN_TTL = 5
PKJWT_KID = "pkjwt-test"


@pytest.fixture(scope="module")
def pkjwt() -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    return make_client_key(PKJWT_KID)


@pytest.fixture(scope="module")
def pkjwt_key(pkjwt: tuple[rsa.RSAPrivateKey, dict[str, Any]]) -> rsa.RSAPrivateKey:
    return pkjwt[0]


@pytest.fixture(scope="module")
def idp(pkjwt: tuple[rsa.RSAPrivateKey, dict[str, Any]]) -> Iterator[OidcProviderProcess]:
    config = default_idp_config(
        REDIRECT_URI, access_token_ttl=ACCESS_TOKEN_TTL, pkjwt_jwks=pkjwt[1]
    )
    proc = OidcProviderProcess(config).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=20)
    jar = aiohttp.CookieJar(unsafe=True)  # the IdP is on 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as session:
        yield session


@pytest.fixture
async def meta(idp: OidcProviderProcess, browser: aiohttp.ClientSession) -> dict[str, Any]:
    async with browser.get(idp.discovery_url) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
    async with browser.get(data["jwks_uri"]) as resp:
        data["jwks"] = await resp.json()
    return data


# -- helpers -----------------------------------------------------------------------------


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_url(meta: dict[str, Any], client_id: str, **extra: str) -> tuple[str, dict[str, str]]:
    verifier, challenge = pkce()
    req = {"state": secrets.token_urlsafe(16), "nonce": secrets.token_urlsafe(16)}
    params = {
        "client_id": client_id,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": DEFAULT_SCOPES,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **req,
        **extra,
    }
    return f"{meta['authorization_endpoint']}?{urlencode(params)}", {**req, "verifier": verifier}


def callback_params(location: str) -> dict[str, str]:
    assert location.startswith(REDIRECT_URI + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def verify(meta: dict[str, Any], token: str, audience: str) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(meta["jwks"])[kid]
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["RS256", "ES256"],
        audience=audience,
        issuer=meta["issuer"],
    )
    return claims


def basic_auth(client_id: str) -> dict[str, str]:
    # RFC 6749 2.3.1: form-urlencode both parts, then Basic (aiohttp.BasicAuth is deprecated)
    return {"Authorization": aiohttp.encode_basic_auth(quote(client_id), quote(CLIENT_SECRET))}


def client_auth(client_id: str, meta: dict[str, Any], key: Any = None) -> dict[str, Any]:
    """Keyword arguments for session.post() authenticating `client_id` its own way."""
    if client_id == "tokengate-post":
        return {"data": {"client_id": client_id, "client_secret": CLIENT_SECRET}}
    if client_id == "tokengate-pkjwt":
        now = int(time.time())
        assertion = jwt.encode(
            {
                "iss": client_id,
                "sub": client_id,
                "aud": meta["token_endpoint"],
                "jti": str(uuid.uuid4()),
                "iat": now,
                "exp": now + 60,
            },
            key,
            algorithm="RS256",
            headers={"kid": PKJWT_KID},
        )
        return {
            "data": {
                "client_id": client_id,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            }
        }
    return {"data": {}, "headers": basic_auth(client_id)}


async def post_form(
    session: aiohttp.ClientSession,
    url: str,
    form: dict[str, str],
    auth: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    data = {**auth["data"], **form}
    async with session.post(url, data=data, headers=auth.get("headers")) as resp:
        return resp.status, await resp.json(content_type=None)


async def login_and_exchange(
    idp: OidcProviderProcess,
    meta: dict[str, Any],
    browser: aiohttp.ClientSession,
    client_id: str = "tokengate",
    login: str = "alice",
    key: Any = None,
    **extra: str,
) -> dict[str, Any]:
    url, req = authorize_url(meta, client_id, **extra)
    location = await complete_login(browser, url, login=login)
    params = callback_params(location)
    assert params["state"] == req["state"]
    assert params["iss"] == idp.issuer
    status, tokens = await post_form(
        browser,
        meta["token_endpoint"],
        {
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": req["verifier"],
        },
        client_auth(client_id, meta, key),
    )
    assert status == 200, tokens
    id_claims = verify(meta, tokens["id_token"], client_id)
    assert id_claims["nonce"] == req["nonce"]
    return {**tokens, "id_claims": id_claims}


async def refresh(
    browser: aiohttp.ClientSession,
    meta: dict[str, Any],
    refresh_token: str,
    client_id: str = "tokengate",
    key: Any = None,
) -> tuple[int, dict[str, Any]]:
    return await post_form(
        browser,
        meta["token_endpoint"],
        {"grant_type": "refresh_token", "refresh_token": refresh_token},
        client_auth(client_id, meta, key),
    )


# -- tests -------------------------------------------------------------------------------


async def test_discovery(idp: OidcProviderProcess, meta: dict[str, Any]) -> None:
    assert meta["issuer"] == idp.issuer == f"http://127.0.0.1:{idp.port}"
    for endpoint in (
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "introspection_endpoint",
        "end_session_endpoint",
        "jwks_uri",
    ):
        assert meta[endpoint].startswith(idp.issuer + "/"), endpoint
    assert meta["backchannel_logout_supported"] is True
    assert meta["backchannel_logout_session_supported"] is True
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        meta["token_endpoint_auth_methods_supported"]
    )
    assert {k["alg"] for k in meta["jwks"]["keys"]} == {"RS256", "ES256"}


async def test_code_flow_rotation_and_reuse(
    idp: OidcProviderProcess, meta: dict[str, Any], browser: aiohttp.ClientSession
) -> None:
    await idp.reset()
    tokens = await login_and_exchange(idp, meta, browser, login="bob.smith")

    assert tokens["id_claims"]["sub"] == "bob.smith"
    assert tokens["id_claims"]["name"] == "Bob Smith"
    assert tokens["id_claims"]["email"] == "bob.smith@example.test"
    assert tokens["id_claims"]["preferred_username"] == "bob.smith"
    assert "sid" not in tokens["id_claims"]  # only for clients with back-channel logout

    access = verify(meta, tokens["access_token"], idp.resource)
    assert access["aud"] == idp.resource
    assert access["sub"] == "bob.smith"
    assert set(access["scope"].split()) == {"api.read", "api.write"}
    assert access["exp"] - access["iat"] == ACCESS_TOKEN_TTL
    assert tokens["expires_in"] <= ACCESS_TOKEN_TTL
    old_rt = tokens["refresh_token"]
    assert old_rt

    status, refreshed = await refresh(browser, meta, old_rt)
    assert status == 200, refreshed
    assert refreshed["refresh_token"] not in (None, old_rt)
    new_access = verify(meta, refreshed["access_token"], idp.resource)
    assert new_access["aud"] == idp.resource
    assert "api.read" in new_access["scope"].split()
    assert verify(meta, refreshed["id_token"], "tokengate")["sub"] == "bob.smith"

    status, reused = await refresh(browser, meta, old_rt)
    assert (status, reused["error"]) == (400, "invalid_grant")
    # Reuse revoked the whole grant: the rotated token is dead too.
    status, after = await refresh(browser, meta, refreshed["refresh_token"])
    assert (status, after["error"]) == (400, "invalid_grant")

    stats = await idp.stats()
    assert stats["grants"] == {"authorization_code": 1, "refresh_token": 1}
    assert stats["errors"] == {"invalid_grant": 2}
    assert stats["errors_by_grant_type"] == {"refresh_token": {"invalid_grant": 2}}
    assert stats["token_requests"] == 4


async def test_revocation_and_introspection(
    idp: OidcProviderProcess, meta: dict[str, Any], browser: aiohttp.ClientSession
) -> None:
    tokens = await login_and_exchange(idp, meta, browser, client_id="tokengate-post")
    rt = tokens["refresh_token"]
    auth = client_auth("tokengate-post", meta)
    introspect = {"token": rt, "token_type_hint": "refresh_token"}

    status, info = await post_form(browser, meta["introspection_endpoint"], introspect, auth)
    assert status == 200
    assert info["active"] is True
    assert info["client_id"] == "tokengate-post"
    assert info["sub"] == "alice"

    status, _ = await post_form(browser, meta["revocation_endpoint"], introspect, auth)
    assert status == 200
    status, info = await post_form(browser, meta["introspection_endpoint"], introspect, auth)
    assert (status, info) == (200, {"active": False})
    status, body = await refresh(browser, meta, rt, client_id="tokengate-post")
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_private_key_jwt_client(
    idp: OidcProviderProcess,
    meta: dict[str, Any],
    browser: aiohttp.ClientSession,
    pkjwt_key: rsa.RSAPrivateKey,
) -> None:
    tokens = await login_and_exchange(
        idp, meta, browser, client_id="tokengate-pkjwt", key=pkjwt_key
    )
    status, refreshed = await refresh(
        browser, meta, tokens["refresh_token"], client_id="tokengate-pkjwt", key=pkjwt_key
    )
    assert status == 200, refreshed
    assert verify(meta, refreshed["access_token"], idp.resource)["client_id"] == "tokengate-pkjwt"


async def test_second_login_reuses_idp_session_and_prompt_consent_still_works(
    idp: OidcProviderProcess, meta: dict[str, Any], browser: aiohttp.ClientSession
) -> None:
    login = f"carol-{secrets.token_hex(4)}"
    await login_and_exchange(idp, meta, browser, login=login)
    again = await login_and_exchange(idp, meta, browser, login="ignored", prompt="consent")
    assert again["refresh_token"]
    assert again["id_claims"]["sub"] == login  # no second sign-in: the IdP session was reused
    assert len(await idp.sessions(login)) == 1


async def test_token_behaviour_injection(
    idp: OidcProviderProcess, meta: dict[str, Any], browser: aiohttp.ClientSession
) -> None:
    tokens = await login_and_exchange(idp, meta, browser)
    await idp.reset()
    try:
        await idp.set_token_behaviour(status=503, grant_type="refresh_token", times=1)
        status, body = await refresh(browser, meta, tokens["refresh_token"])
        assert (status, body["error"]) == (503, "temporarily_unavailable")

        # times=1: back to normal, and the injected failure did not consume the token.
        status, body = await refresh(browser, meta, tokens["refresh_token"])
        assert status == 200, body
        rt = body["refresh_token"]

        await idp.set_token_behaviour(delay_ms=300)
        started = time.monotonic()
        status, body = await refresh(browser, meta, rt)
        assert status == 200, body
        assert time.monotonic() - started >= 0.3
        rt = body["refresh_token"]

        await idp.set_token_behaviour(hang=True)
        with pytest.raises(TimeoutError):
            async with browser.post(
                meta["token_endpoint"],
                data={"grant_type": "refresh_token", "refresh_token": rt},
                headers=basic_auth("tokengate"),
                timeout=aiohttp.ClientTimeout(total=0.3),
            ):
                pass
    finally:
        await idp.reset()
    status, body = await refresh(browser, meta, rt)
    assert status == 200, body


@pytest.fixture
async def logout_receiver(
    idp: OidcProviderProcess,
) -> AsyncIterator[tuple[str, list[str]]]:
    """An RP back-channel logout endpoint on loopback, and a client `idp-bc` pointing at it."""
    received: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        received.append(str((await request.post())["logout_token"]))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/auth/backchannel-logout", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await idp.update_client(
            "idp-bc",
            client_secret=CLIENT_SECRET,
            token_endpoint_auth_method="client_secret_basic",
            redirect_uris=[REDIRECT_URI],
            post_logout_redirect_uris=[f"{RP}/"],
            backchannel_logout_uri=f"http://127.0.0.1:{port}/auth/backchannel-logout",
        )
        yield "idp-bc", received
    finally:
        await runner.cleanup()


def check_logout_token(meta: dict[str, Any], token: str, client_id: str, sid: str) -> None:
    claims = verify(meta, token, client_id)
    assert claims["sub"] == "alice"
    assert claims["sid"] == sid
    assert "http://schemas.openid.net/event/backchannel-logout" in claims["events"]
    assert "nonce" not in claims


async def test_backchannel_logout_from_test_endpoint(
    idp: OidcProviderProcess,
    meta: dict[str, Any],
    browser: aiohttp.ClientSession,
    logout_receiver: tuple[str, list[str]],
) -> None:
    client_id, received = logout_receiver
    tokens = await login_and_exchange(idp, meta, browser, client_id=client_id)
    sid = tokens["id_claims"]["sid"]

    result = await idp.backchannel_logout("alice", sid=sid)
    assert result == {
        "sessions": 1,
        "deliveries": [{"client_id": client_id, "sid": sid, "ok": True}],
    }
    assert len(received) == 1
    check_logout_token(meta, received[0], client_id, sid)

    status, body = await refresh(browser, meta, tokens["refresh_token"], client_id=client_id)
    assert (status, body["error"]) == (400, "invalid_grant")
    live_sids = [a["sid"] for s in await idp.sessions("alice") for a in s["clients"].values()]
    assert sid not in live_sids


async def test_rp_initiated_logout_sends_backchannel_logout(
    idp: OidcProviderProcess,
    meta: dict[str, Any],
    browser: aiohttp.ClientSession,
    logout_receiver: tuple[str, list[str]],
) -> None:
    client_id, received = logout_receiver
    tokens = await login_and_exchange(idp, meta, browser, client_id=client_id)
    end_session = (
        meta["end_session_endpoint"]
        + "?"
        + urlencode(
            {
                "id_token_hint": tokens["id_token"],
                "post_logout_redirect_uri": f"{RP}/",
                "state": "bye",
            }
        )
    )
    location = await complete_logout(browser, end_session)
    assert location == f"{RP}/?state=bye"
    assert len(received) == 1
    check_logout_token(meta, received[0], client_id, tokens["id_claims"]["sid"])


async def test_complete_login_starts_at_the_rp(
    idp: OidcProviderProcess, meta: dict[str, Any], browser: aiohttp.ClientSession
) -> None:
    """As with tokengate: the RP's /auth/login redirects to the IdP; we stop at its callback."""
    url, req = authorize_url(meta, "tokengate")

    async def login(request: web.Request) -> web.Response:
        raise web.HTTPFound(url)

    app = web.Application()
    app.router.add_get("/auth/login", login)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        location = await complete_login(browser, f"http://127.0.0.1:{port}/auth/login")
    finally:
        await runner.cleanup()
    params = callback_params(location)
    assert params["state"] == req["state"]
    assert params["code"]


async def test_complete_login_refuses_the_default_cookie_jar(idp: OidcProviderProcess) -> None:
    url = idp.url("/auth?client_id=tokengate&response_type=code")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(IdpError, match="unsafe=True"):
            await complete_login(session, url)
