"""Browser sessions against the real oidc-provider and a real redis-server."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import pytest
from redis import asyncio as redis_asyncio

from gateway.app import STORE
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session
from gateway.sessions.redis_store import RedisSessionStore
from tests.integration.conftest import Bff, start_bff
from tests.support.feed import feed_of, wait_subscribed
from tests.support.idp import CLIENT_SECRET, OidcProviderProcess, complete_login
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration


def session_cookie(bff: Bff, browser: aiohttp.ClientSession) -> str | None:
    for cookie in browser.cookie_jar:
        if cookie.key == bff.settings.session.cookie_name and cookie.value:
            return cookie.value
    return None


async def stored_session(bff: Bff, browser: aiohttp.ClientSession) -> Session | None:
    value = session_cookie(bff, browser)
    secret = parse_secret(value)
    assert secret is not None
    return await bff.app[STORE].load(derive_handle(secret))


async def introspect(bff: Bff, token: str) -> dict[str, Any]:
    """RFC 7662 at the real IdP, as the confidential client."""
    basic = base64.b64encode(f"tokengate:{CLIENT_SECRET}".encode()).decode()
    async with aiohttp.ClientSession() as http:
        async with http.get(bff.idp.discovery_url) as resp:
            discovery = await resp.json()
        async with http.post(
            discovery["introspection_endpoint"],
            data={"token": token},
            headers={"Authorization": f"Basic {basic}"},
        ) as resp:
            result: dict[str, Any] = await resp.json()
            return result


async def test_login_api_call_logout_through_the_real_idp(bff: Bff) -> None:
    browser = bff.browser()
    assert await bff.login(browser, "/app/page?x=1") == "/app/page?x=1"
    status, body = await bff.api(browser, "/api/me", headers={"Cookie": "theme=dark"})
    assert status == 200, body
    seen = bff.upstream.seen[-1]
    session = await stored_session(bff, browser)
    assert session is not None
    assert seen.headers["Authorization"] == f"Bearer {session.access_token}"
    cookie_value = session_cookie(bff, browser)
    assert cookie_value is not None
    assert cookie_value not in seen.headers.get("Cookie", "")
    assert "theme=dark" in seen.headers.get("Cookie", "")
    assert session.refresh_token is not None
    assert (await introspect(bff, session.refresh_token))["active"] is True

    status, info = await bff.api(browser, "/auth/session")
    assert status == 200
    assert info["authenticated"] is True
    assert info["claims"]["sub"] == "alice"
    assert session.access_token not in json.dumps(info)

    status, body = await bff.api(browser, "/auth/logout", method="POST")
    assert status == 200
    assert body["logout_url"].startswith(bff.idp.issuer)
    assert "id_token_hint=" in body["logout_url"]
    assert (await introspect(bff, session.refresh_token))["active"] is False
    assert (await bff.api(browser, "/auth/session"))[1] == {"authenticated": False}
    status, body = await bff.api(browser, "/api/me")
    assert status == 401


async def test_session_cookie_attributes(bff: Bff) -> None:
    browser = bff.browser()
    start = f"{bff.url}/auth/login?return_to=/"
    async with browser.get(start, allow_redirects=False) as resp:
        login_cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in login_cookie
    assert "SameSite=Lax" in login_cookie
    callback = await complete_login(browser, start)
    async with browser.get(callback, allow_redirects=False) as resp:
        cookies = resp.headers.getall("Set-Cookie")
    ours = next(c for c in cookies if c.startswith("tokengate="))
    for attribute in ("HttpOnly", "Path=/", "SameSite=Lax", "Max-Age=86400"):
        assert attribute in ours
    assert "Domain" not in ours


async def test_each_login_creates_a_new_session(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    first = session_cookie(bff, browser)
    first_secret = parse_secret(first)
    assert first_secret is not None
    await bff.login(browser)
    second = session_cookie(bff, browser)
    assert second != first
    assert await bff.app[STORE].load(derive_handle(first_secret)) is None


@pytest.mark.parametrize(
    "value",
    [
        "x",  # truncated
        "A" * 43,  # well-formed but unknown
        "A" * 42 + "!",  # tampered alphabet
        "A" * 44,  # too long
    ],
)
async def test_bad_cookies_are_401_without_a_store_error(bff: Bff, value: str) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"{bff.url}/api/me", headers={"Cookie": f"tokengate={value}", "X-CSRF": "1"}
        ) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert body["error"] in ("session_expired", "unauthenticated")
    assert body["login_url"] == f"{bff.url}/auth/login"
    assert bff.upstream.seen == []


async def test_tampered_cookie_of_a_live_session_is_401(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    value = session_cookie(bff, browser)
    assert value is not None
    flipped = ("B" if value[0] != "B" else "C") + value[1:]
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"{bff.url}/api/me", headers={"Cookie": f"tokengate={flipped}", "X-CSRF": "1"}
        ) as resp,
    ):
        assert resp.status == 401


async def test_cookie_request_without_csrf_header_is_403(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    async with browser.get(f"{bff.url}/api/me") as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "csrf"
    async with browser.get(
        f"{bff.url}/api/me", headers={"X-CSRF": "1", "Origin": "http://evil.example"}
    ) as resp:
        assert resp.status == 403
    assert bff.upstream.seen == []


async def test_bearer_header_wins_over_the_cookie(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    session = await stored_session(bff, browser)
    assert session is not None
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"{bff.url}/api/me", headers={"Authorization": f"Bearer {session.access_token}"}
        ) as resp:
            assert resp.status == 200  # a JWT from the real IdP, validated by its JWKS
        async with client.get(
            f"{bff.url}/session-only/x",
            headers={"Authorization": f"Bearer {session.access_token}"},
        ) as resp:
            assert resp.status == 200


async def test_backchannel_logout_from_the_idp_ends_the_session(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    assert (await bff.api(browser))[0] == 200
    await bff.idp.backchannel_logout("alice")
    assert (await bff.idp.stats())["backchannel_logout"]
    status, body = await bff.api(browser)
    assert status == 401
    assert body["error"] == "session_expired"


async def test_backchannel_logout_rejects_garbage_with_400(bff: Bff) -> None:
    async with aiohttp.ClientSession() as client:
        for form in ({}, {"logout_token": "not-a-jwt"}):
            async with client.post(f"{bff.url}/auth/backchannel-logout", data=form) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"] == "invalid_request"


@pytest.mark.parametrize(
    "return_to",
    [
        "//evil.com",
        "https://evil.com",
        "/\\evil.com",
        "%2F%2Fevil.com",
        "/%2F%2Fevil.com",
        "\\\\evil.com",
        "/%5Cevil.com",
        "javascript:alert(1)",
        "/%0d%0aSet-Cookie:x=1",
    ],
)
async def test_login_refuses_open_redirects(bff: Bff, return_to: str) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"{bff.url}/auth/login", params={"return_to": return_to}, allow_redirects=False
        ) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_callback_state_mismatch_and_replay_are_400(bff: Bff) -> None:
    browser = bff.browser()
    callback = await complete_login(browser, f"{bff.url}/auth/login?return_to=/")
    forged = callback.replace("state=", "state=x")
    async with browser.get(forged, allow_redirects=False) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_login_state"
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302
    async with browser.get(callback, allow_redirects=False) as resp:  # replay
        assert resp.status == 400
    async with (
        aiohttp.ClientSession() as other_browser,  # no binding cookie
        other_browser.get(callback, allow_redirects=False) as resp,
    ):
        assert resp.status == 400


async def test_idp_error_in_callback_is_a_clear_json_error(bff: Bff) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"{bff.url}/auth/callback",
            params={"error": "access_denied", "error_description": "<script>x</script>"},
        ) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert body["error"] == "login_failed"
    assert "access_denied" in body["error_description"]
    assert "<script>" not in body["error_description"]


async def test_redis_down_is_503_for_sessions_while_bearer_keeps_working(
    idp: OidcProviderProcess,
) -> None:
    redis = RedisServerProcess().start()
    bff, server, upstream_server = await start_bff(idp, redis.url)
    try:
        browser = bff.browser()
        await bff.login(browser)
        session = await stored_session(bff, browser)
        assert session is not None
        redis.kill()
        # The local session cache serves only while its invalidation feed is up; the feed
        # breaks with Redis, and from then on every session request needs Redis.
        store = bff.app[STORE]
        assert isinstance(store, RedisSessionStore)
        await wait_subscribed(feed_of(store), False, timeout_s=5)
        status, body = await bff.api(browser, "/api/me")
        assert status == 503
        assert body["error"] == "session_store_unavailable"
        async with (
            aiohttp.ClientSession() as client,
            client.get(
                f"{bff.url}/api/me", headers={"Authorization": f"Bearer {session.access_token}"}
            ) as resp,
        ):
            assert resp.status == 200
        redis.restart()  # an empty Redis: the session is gone, cleanly
        status, body = await bff.api(browser, "/api/me")
        assert status == 401
    finally:
        for browser in bff.browsers:
            await browser.close()
        await server.close()
        await upstream_server.close()
        redis.stop()


async def test_redis_dump_of_a_live_session_holds_no_token_and_no_cookie(
    bff: Bff, redis_server: RedisServerProcess
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    session = await stored_session(bff, browser)
    assert session is not None
    cookie = session_cookie(bff, browser)
    assert cookie is not None
    secret = parse_secret(cookie)
    assert secret is not None
    dump = b""
    async with redis_asyncio.Redis.from_url(redis_server.url) as raw:
        async for key in raw.scan_iter(count=1000):
            dump += key + (await raw.dump(key) or b"")
    secrets_found = {
        "access_token": session.access_token.encode(),
        "refresh_token": (session.refresh_token or "").encode(),
        "id_token": (session.id_token or "").encode(),
        "cookie": cookie.encode(),
        "cookie_secret": secret,
        "session_key": derive_handle(secret).key,
        "subject": b"alice",
    }
    assert [name for name, value in secrets_found.items() if value and value in dump] == []


async def test_auth_paths_are_reserved(bff: Bff) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{bff.url}/auth/logout") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"
        async with client.get(f"{bff.url}/auth/anything") as resp:
            assert resp.status == 404
    assert bff.upstream.seen == []


async def test_login_binding_cookie_never_reaches_the_upstream(bff: Bff) -> None:
    browser = bff.browser()
    async with browser.get(f"{bff.url}/auth/login?return_to=/", allow_redirects=False):
        pass
    assert any(c.key == "tokengate-login" for c in browser.cookie_jar)
    async with browser.get(f"{bff.url}/page", headers={"Cookie": "theme=dark"}) as resp:
        assert resp.status == 200
    forwarded = bff.upstream.seen[-1].headers.get("Cookie", "")
    assert "tokengate-login" not in forwarded


async def test_a_session_from_the_real_idp_costs_redis_a_few_kilobytes(
    bff: Bff, redis_server: RedisServerProcess
) -> None:
    """What one browser session costs Redis (``MEMORY USAGE``, every element counted): its
    HASH (sealed access, refresh and ID token from oidc-provider, the kept claims) and its
    two index SETs. A budget, so that a change which bloats the session shows up here."""
    browser = bff.browser()
    await bff.login(browser)
    session = await stored_session(bff, browser)
    assert session is not None
    assert session.id_token
    assert session.refresh_token
    cookie = session_cookie(bff, browser)
    secret = parse_secret(cookie or "")
    assert secret is not None
    prefix = bff.settings.session.key_prefix
    storage_id = derive_handle(secret).storage_id
    async with redis_asyncio.Redis.from_url(redis_server.url) as raw:
        session_bytes = await raw.memory_usage(f"{prefix}:{{{storage_id}}}:s", samples=0)
        index_bytes = {
            key.decode().split(":")[1]: await raw.memory_usage(key, samples=0)
            async for key in raw.scan_iter(match=f"{prefix}:s[iu][bd]:*", count=1000)
            if await raw.sismember(key, storage_id)  # type: ignore[misc]
        }
    sizes = [len(t) for t in (session.access_token, session.refresh_token, session.id_token)]
    print(f"tokens {sizes} B: session HASH {session_bytes} B, index SETs {index_bytes} B")
    assert session_bytes is not None
    assert 1000 < session_bytes <= 4096
    # Indexed by subject (a SET shared with alice's other sessions in this Redis) and by
    # the IdP's session id (this login's alone).
    assert sorted(index_bytes) == ["sid", "sub"]
    assert index_bytes["sid"] is not None
    assert index_bytes["sid"] <= 512
