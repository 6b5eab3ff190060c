"""Client authentication at the token endpoint, against the real oidc-provider: a login
(code exchange) and a forced refresh for ``client_secret_basic`` (client ``tokengate``),
``client_secret_post`` (``tokengate-post``) and ``private_key_jwt`` (``tokengate-pkjwt``,
RFC 7523). Grants are counted at the IdP.

oidc-provider accepts either secret method from a client registered for one of them, so
for those the token requests go through a recording relay that says which method arrived.
A ``private_key_jwt`` client has no secret: the IdP itself proves the method (and the
assertion's ``aud`` must be its own token endpoint, so no relay there).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import STORE
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import SessionHandle
from tests.integration.conftest import Bff, start_bff
from tests.support.idp import OidcProviderProcess
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration


class TokenRelay:
    """Forwards token requests to the IdP verbatim and records each one's client auth."""

    def __init__(self, token_endpoint: str) -> None:
        self.token_endpoint = token_endpoint
        self.methods: list[str] = []

    def web_app(self) -> web.Application:
        async def relay(request: web.Request) -> web.Response:
            form = await request.post()
            basic = request.headers.get("Authorization", "").startswith("Basic ")
            if basic and "client_secret" not in form:
                self.methods.append("client_secret_basic")
            elif "client_secret" in form and not basic:
                self.methods.append("client_secret_post")
            else:
                self.methods.append("other")
            headers = {"Content-Type": request.headers["Content-Type"]}
            if basic:
                headers["Authorization"] = request.headers["Authorization"]
            async with (
                aiohttp.ClientSession() as http,
                http.post(self.token_endpoint, data=await request.read(), headers=headers) as resp,
            ):
                return web.Response(
                    status=resp.status, body=await resp.read(), content_type="application/json"
                )

        app = web.Application()
        app.router.add_post("/token", relay)
        return app


def oidc_overrides(method: str, pkjwt_pem: str) -> dict[str, Any]:
    if method == "client_secret_basic":
        return {"client_id": "tokengate", "client_auth": "client_secret_basic"}
    if method == "client_secret_post":
        return {"client_id": "tokengate-post", "client_auth": "client_secret_post"}
    return {
        "client_id": "tokengate-pkjwt",
        "client_auth": "private_key_jwt",
        "client_secret": None,
        "private_key": pkjwt_pem,
        "private_key_id": "tokengate-pkjwt",
    }


@pytest.fixture(params=["client_secret_basic", "client_secret_post", "private_key_jwt"])
async def method_bff(
    request: pytest.FixtureRequest,
    idp: OidcProviderProcess,
    redis_server: RedisServerProcess,
    pkjwt_pem: str,
) -> AsyncIterator[tuple[Bff, TokenRelay | None]]:
    method: str = request.param
    overrides: dict[str, Any] = {"oidc": oidc_overrides(method, pkjwt_pem)}
    relay, relay_server = None, None
    if method != "private_key_jwt":
        async with aiohttp.ClientSession() as http, http.get(idp.discovery_url) as resp:
            relay = TokenRelay((await resp.json())["token_endpoint"])
        relay_server = TestServer(relay.web_app(), host="127.0.0.1")
        await relay_server.start_server()
        overrides["refresh"] = {"token_endpoint": str(relay_server.make_url("/token"))}
    bff, server, upstream_server = await start_bff(idp, redis_server.url, **overrides)
    try:
        yield bff, relay
    finally:
        for browser in bff.browsers:
            await browser.close()
        await server.close()
        await upstream_server.close()
        if relay_server is not None:
            await relay_server.close()


def handle_of(bff: Bff, browser: aiohttp.ClientSession) -> SessionHandle:
    for cookie in browser.cookie_jar:
        if cookie.key == bff.settings.session.cookie_name and cookie.value:
            secret = parse_secret(cookie.value)
            assert secret is not None
            return derive_handle(secret)
    raise AssertionError("no session cookie")


async def test_login_and_a_forced_refresh_authenticate_as_the_client_is_registered(
    method_bff: tuple[Bff, TokenRelay | None],
) -> None:
    bff, relay = method_bff
    if bff.settings.oidc.client_auth == "private_key_jwt":
        assert bff.settings.oidc.client_secret is None  # the key alone authenticates
    browser = bff.browser()
    await bff.login(browser)
    stats = await bff.idp.stats()
    assert stats["grants"].get("authorization_code") == 1
    assert not stats["errors"]

    handle = handle_of(bff, browser)
    store = bff.app[STORE]
    session = await store.load(handle)
    assert session is not None
    expired = dataclasses.replace(session, access_expires_at=time.time() - 1)
    assert await store.save(handle, expired) is not None
    status, body = await bff.api(browser, "/api/items")
    assert status == 200, body

    stats = await bff.idp.stats()
    assert stats["grants"].get("refresh_token") == 1
    assert not stats["errors"]
    refreshed = await store.load(handle)
    assert refreshed is not None
    assert refreshed.access_token != session.access_token
    assert bff.upstream.seen[-1].headers["Authorization"] == f"Bearer {refreshed.access_token}"
    if relay is not None:
        method = bff.settings.oidc.client_auth
        assert relay.methods == [method, method]  # the code exchange, then the refresh
