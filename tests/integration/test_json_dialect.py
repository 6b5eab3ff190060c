"""Custom token APIs end to end: a login through a token-capture route, session requests,
refresh by the ``json`` dialect under the lock, a dead refresh token, an API outage, logout.

Both shapes of custom token API run every test: a TokenIDP-style ``POST /token`` (wrapped replies,
``isSuccess``, rotation with reuse detection, client binding; with ``oidc.jwks_uri``) and a
``/User/Login`` + ``/User/RefreshToken`` API (``Version: 2.0``, the current access token as
Bearer; no OIDC at all). Refreshes are counted at the fake APIs, requests at the upstream,
against a real redis-server. An "expired" session is made by rewriting its stored expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import STORE, build_app
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session, SessionHandle
from gateway.settings import Settings, parse_settings
from tests.fakes.tokenidp import AUDIENCE, FakeTokenIdp
from tests.fakes.upstream import FakeUpstream
from tests.fakes.user_api import FakeUserApi
from tests.integration.conftest import FakeClock, free_port
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration

Fake = FakeTokenIdp | FakeUserApi

TOKENIDP_PATHS = {
    "access_token": "data.accessToken",
    "refresh_token": "data.refreshToken",
    "expires_in": "data.expiresIn",
    "token_type": "data.tokenType",
    "success": "isSuccess",
}
USER_API_PATHS = {
    "access_token": "accessToken",
    "refresh_token": "refreshToken",
    "expires_in": None,
}


def tokenidp_config(api_url: str, upstream_url: str) -> dict[str, Any]:
    """What config/tokenidp.yaml says, pointed at the fakes."""
    return {
        "oidc": {
            "client_id": "tokengate-spa",
            "jwks_uri": f"{api_url}/.well-known/jwks.json",
            "audience": AUDIENCE,
        },
        "refresh": {
            "dialect": "json",
            "scope": ["api"],
            "json": {
                "url": f"{api_url}/token",
                "body": {
                    "grantType": "refresh_token",
                    "clientId": "{client_id}",
                    "refreshToken": "{refresh_token}",
                    "scope": "{scope}",
                },
                "response": TOKENIDP_PATHS,
                "dead_token_statuses": [],
                "dead_token_path": "errorCode",
                "dead_token_values": ["INVALID_REFRESH_TOKEN"],
                "logout": {
                    "url": f"{api_url}/logout",
                    "body": {"clientId": "{client_id}", "refreshToken": "{refresh_token}"},
                },
            },
        },
        "routes": [
            {
                "prefix": "/token",
                "upstream": api_url,
                "auth": "none",
                "capture_tokens": {
                    "response": TOKENIDP_PATHS,
                    "claims_paths": {"name": "data.user.name"},
                },
            },
            {"prefix": "/api", "upstream": upstream_url, "auth": "session_or_bearer"},
        ],
    }


def user_api_config(api_url: str, upstream_url: str) -> dict[str, Any]:
    """What config/user-refreshtoken.yaml says, pointed at the fakes: no OIDC at all."""
    return {
        "refresh": {
            "dialect": "json",
            "json": {
                "url": f"{api_url}/User/RefreshToken",
                "headers": {"Version": "2.0"},
                "send_access_token": True,
                "body": {"refreshToken": "{refresh_token}"},
                "response": USER_API_PATHS,
                "dead_token_statuses": [401, 403],
                "logout": {
                    "url": f"{api_url}/User/Logout",
                    "send_access_token": True,
                    "body": {"refreshToken": "{refresh_token}"},
                },
            },
        },
        "routes": [
            {
                "prefix": "/User/Login",
                "upstream": api_url,
                "auth": "none",
                "capture_tokens": {
                    "response": USER_API_PATHS,
                    "subject_path": "user.userName",
                    "claims_paths": {"user_id": "user.id"},
                },
            },
            {"prefix": "/User/Me", "upstream": api_url, "auth": "session"},
            {"prefix": "/api", "upstream": upstream_url, "auth": "session"},
        ],
    }


@dataclass(frozen=True)
class Shape:
    name: str
    fake: Callable[[], Fake]
    config: Callable[[str, str], dict[str, Any]]
    login_path: str
    login_body: dict[str, Any]
    token_fields: tuple[str, ...]  # names that must never reach the browser
    subject: str


SHAPES = [
    Shape(
        "tokenidp",
        FakeTokenIdp,
        tokenidp_config,
        "/token",
        {
            "grantType": "password",
            "clientId": "tokengate-spa",
            "username": "alice",
            "password": "wonderland",
            "scope": "api",
        },
        ("accessToken", "refreshToken", "idToken"),
        "alice",
    ),
    Shape(
        "user-api",
        FakeUserApi,
        user_api_config,
        "/User/Login",
        {"username": "bob", "password": "builder"},
        ("accessToken", "refreshToken"),
        "bob",
    ),
]


@dataclass
class JsonBff:
    """One tokengate in front of a fake token API and a fake upstream."""

    url: str
    app: web.Application
    shape: Shape
    api: Any  # FakeTokenIdp | FakeUserApi; both count refresh_grants
    upstream: FakeUpstream
    clock: FakeClock
    settings: Settings
    browsers: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.browsers.append(session)
        return session

    async def login(
        self, browser: aiohttp.ClientSession, *, csrf: bool = True, **changes: Any
    ) -> tuple[int, Any, str]:
        """POST the login form through the capture route: (status, JSON body, raw body)."""
        status, body, raw, _ = await self.login_with_headers(browser, csrf=csrf, **changes)
        return status, body, raw

    async def login_with_headers(
        self, browser: aiohttp.ClientSession, *, csrf: bool = True, **changes: Any
    ) -> tuple[int, Any, str, list[tuple[str, str]]]:
        headers = {"X-CSRF": "1"} if csrf else {}
        body = {**self.shape.login_body, **changes}
        url = self.url + self.shape.login_path
        async with browser.post(url, json=body, headers=headers) as resp:
            raw = await resp.text()
            return resp.status, json.loads(raw) if raw else None, raw, list(resp.headers.items())

    async def call(
        self, browser: aiohttp.ClientSession, path: str = "/api/items", method: str = "GET"
    ) -> tuple[int, Any, dict[str, str]]:
        async with browser.request(method, self.url + path, headers={"X-CSRF": "1"}) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, body, dict(resp.headers)

    def handle_of(self, browser: aiohttp.ClientSession) -> SessionHandle:
        for cookie in browser.cookie_jar:
            if cookie.key == self.settings.session.cookie_name and cookie.value:
                secret = parse_secret(cookie.value)
                assert secret is not None
                return derive_handle(secret)
        raise AssertionError("no session cookie")

    async def load(self, handle: SessionHandle) -> Session | None:
        return await self.app[STORE].load(handle)

    async def set_expiry(self, handle: SessionHandle, expires_at: float) -> Session:
        session = await self.load(handle)
        assert session is not None
        changed = dataclasses.replace(session, access_expires_at=expires_at)
        saved = await self.app[STORE].save(handle, changed)
        assert saved is not None
        return saved

    def upstream_tokens(self) -> set[str]:
        return {seen.headers.get("Authorization", "") for seen in self.upstream.seen}


@contextlib.asynccontextmanager
async def start_json_bff(shape: Shape, redis_url: str) -> AsyncIterator[JsonBff]:
    async with contextlib.AsyncExitStack() as stack:
        fake = shape.fake()
        api_url = await serve(stack, fake.web_app())
        if isinstance(fake, FakeTokenIdp):
            fake.url = api_url
        upstream = FakeUpstream()
        upstream_url = await serve(stack, upstream.web_app())
        port = free_port()
        config = shape.config(api_url, upstream_url)
        config.update(
            listen={"host": "127.0.0.1", "port": port},
            public_url=f"http://127.0.0.1:{port}",
            session={
                "store": "redis",
                "redis_url": redis_url,
                "cookie_name": "tokengate",
                "cookie_secure": False,
            },
            limits={"shutdown_delay_s": 0},
        )
        config["refresh"].update(ahead_s=5, timeout_s=2)
        settings = parse_settings(config)
        clock = FakeClock()
        app = build_app(settings, clock=clock)
        await serve(stack, app, port=port)
        bff = JsonBff(f"http://127.0.0.1:{port}", app, shape, fake, upstream, clock, settings)
        try:
            yield bff
        finally:
            for browser in bff.browsers:
                await browser.close()


async def serve(stack: contextlib.AsyncExitStack, app: web.Application, port: int = 0) -> str:
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    stack.push_async_callback(server.close)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture(params=SHAPES, ids=[shape.name for shape in SHAPES])
async def jbff(
    request: pytest.FixtureRequest, redis_server: RedisServerProcess
) -> AsyncIterator[JsonBff]:
    async with start_json_bff(request.param, redis_server.url) as bff:
        yield bff


@pytest.fixture
async def tokenidp_bff(redis_server: RedisServerProcess) -> AsyncIterator[JsonBff]:
    async with start_json_bff(SHAPES[0], redis_server.url) as bff:
        yield bff


@pytest.fixture
async def user_api_bff(redis_server: RedisServerProcess) -> AsyncIterator[JsonBff]:
    async with start_json_bff(SHAPES[1], redis_server.url) as bff:
        yield bff


async def logged_in(jbff: JsonBff) -> tuple[aiohttp.ClientSession, SessionHandle, Session]:
    browser = jbff.browser()
    status, _, _ = await jbff.login(browser)
    assert status == 200
    handle = jbff.handle_of(browser)
    session = await jbff.load(handle)
    assert session is not None
    return browser, handle, session


async def test_capture_login_starts_a_session_and_the_browser_never_sees_a_token(
    jbff: JsonBff,
) -> None:
    browser = jbff.browser()
    status, body, raw, headers = await jbff.login_with_headers(browser)
    assert status == 200
    assert ("Cache-Control", "no-store") in headers
    for name in jbff.shape.token_fields:
        assert name not in raw
    for token in jbff.api.issued:
        assert token not in raw
        assert not any(token in value for _, value in headers)
    assert {cookie.key for cookie in browser.cookie_jar} <= {"tokengate", "theme"}
    assert "user" in (body.get("data", body))  # the rest of the reply is relayed
    handle = jbff.handle_of(browser)
    session = await jbff.load(handle)
    assert session is not None
    assert session.subject == jbff.shape.subject
    assert session.access_token == jbff.api.latest_access
    assert session.refresh_token in jbff.api.issued
    assert session.access_expires_at > time.time() + 200

    status, body, _ = await jbff.call(browser, "/auth/session")
    assert status == 200
    assert body["authenticated"] is True
    assert body["claims"]["sub"] == jbff.shape.subject
    assert not any(token in json.dumps(body) for token in jbff.api.issued)

    status, _, _ = await jbff.call(browser)
    assert status == 200
    assert jbff.upstream_tokens() == {f"Bearer {session.access_token}"}


async def test_tokenidp_tokens_are_also_accepted_as_bearer_by_jwks(
    tokenidp_bff: JsonBff,
) -> None:
    _, _, session = await logged_in(tokenidp_bff)
    headers = {"Authorization": f"Bearer {session.access_token}"}
    async with aiohttp.ClientSession() as mobile:
        resp = await mobile.get(tokenidp_bff.url + "/api/items", headers=headers)
        assert resp.status == 200
        resp.release()


async def test_the_user_api_accepts_the_session_token_through_tokengate(
    user_api_bff: JsonBff,
) -> None:
    browser, _, _ = await logged_in(user_api_bff)
    status, body, _ = await user_api_bff.call(browser, "/User/Me")
    assert (status, body) == (200, {"userName": "bob"})
    # The login's own cookies are relayed, all but the one that carried a token.
    assert {cookie.key for cookie in browser.cookie_jar} == {"tokengate", "theme"}


async def test_bad_credentials_are_relayed_unchanged_and_start_no_session(
    jbff: JsonBff,
) -> None:
    browser = jbff.browser()
    status, body, _ = await jbff.login(browser, password="wrong")
    assert status in (400, 401)
    assert body in (
        {"isSuccess": False, "errorCode": "INVALID_CREDENTIALS"},
        {"message": "Invalid username or password"},
    )
    assert not any(c.key == "tokengate" for c in browser.cookie_jar)


async def test_a_login_without_the_csrf_header_never_reaches_the_api(jbff: JsonBff) -> None:
    browser = jbff.browser()
    status, body, _ = await jbff.login(browser, csrf=False)
    assert status == 403
    assert body["error"] == "csrf"
    assert jbff.api.issued == []


async def test_a_second_login_replaces_the_first_session(jbff: JsonBff) -> None:
    browser, first, _ = await logged_in(jbff)
    status, _, _ = await jbff.login(browser)
    assert status == 200
    second = jbff.handle_of(browser)
    assert second.storage_id != first.storage_id
    assert await jbff.load(first) is None  # no fixation
    assert await jbff.load(second) is not None


async def test_100_concurrent_requests_on_an_expired_session_refresh_once(
    jbff: JsonBff, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    browser, handle, stale = await logged_in(jbff)
    await jbff.set_expiry(handle, time.time() - 1)
    results = await asyncio.gather(*(jbff.call(browser) for _ in range(100)))
    assert [status for status, _, _ in results] == [200] * 100
    assert jbff.api.refresh_grants == 1
    fresh = jbff.api.latest_access
    assert fresh != stale.access_token
    assert jbff.upstream_tokens() == {f"Bearer {fresh}"}
    session = await jbff.load(handle)
    assert session is not None
    assert session.access_token == fresh
    assert session.refresh_token not in (None, stale.refresh_token)  # rotated
    assert session.access_expires_at > time.time() + 200
    assert any(r.getMessage() == "refresh" for r in caplog.records)  # the log was captured
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert not any(token in logged for token in jbff.api.issued)


async def test_the_refresh_is_sent_in_the_apis_own_shape(jbff: JsonBff) -> None:
    browser, handle, stale = await logged_in(jbff)
    await jbff.set_expiry(handle, time.time() - 1)
    status, _, _ = await jbff.call(browser)
    assert status == 200
    if isinstance(jbff.api, FakeTokenIdp):
        assert jbff.api.last_refresh_body == {
            "grantType": "refresh_token",
            "clientId": "tokengate-spa",
            "refreshToken": stale.refresh_token,
            "scope": "api",
        }
    else:
        headers = jbff.api.last_refresh_headers
        assert headers["Version"] == "2.0"
        assert headers["Authorization"] == f"Bearer {stale.access_token}"
        # The API revoked the previous access token; the new one works through tokengate.
        async with aiohttp.ClientSession() as direct:
            me = str(jbff.settings.routes[1].upstream) + "/User/Me"
            old = {"Authorization": f"Bearer {stale.access_token}"}
            async with direct.get(me, headers=old) as resp:
                assert resp.status == 401
        status, _, _ = await jbff.call(browser, "/User/Me")
        assert status == 200


async def kill_refresh_token(jbff: JsonBff, session: Session) -> None:
    """The API stops honouring the session's refresh token."""
    if isinstance(jbff.api, FakeTokenIdp):
        # Someone else uses it first (a thief): rotation makes ours a reuse, which the API
        # answers by revoking the whole family.
        body = {
            "grantType": "refresh_token",
            "clientId": "tokengate-spa",
            "refreshToken": session.refresh_token,
        }
        async with aiohttp.ClientSession() as thief:
            resp = await thief.post(jbff.api.url + "/token", json=body)
            assert resp.status == 200
            resp.release()
    else:
        jbff.api.revoke_all()


async def test_a_dead_refresh_token_ends_the_session_with_401(jbff: JsonBff) -> None:
    browser, handle, session = await logged_in(jbff)
    await kill_refresh_token(jbff, session)
    grants = jbff.api.refresh_grants
    await jbff.set_expiry(handle, time.time() - 1)
    status, body, headers = await jbff.call(browser)
    assert status == 401
    assert body["error"] == "session_expired"
    assert "tokengate=" in headers.get("Set-Cookie", "")
    assert await jbff.load(handle) is None
    assert jbff.api.refresh_grants == grants  # tried, refused, not granted
    assert len(jbff.upstream.seen) == 0


async def test_an_api_outage_serves_a_valid_token_then_503_then_recovers(
    jbff: JsonBff,
) -> None:
    browser, handle, session = await logged_in(jbff)
    jbff.api.down = True
    jbff.api.arrived.clear()
    # Inside refresh.ahead_s but not expired: the refresh fails, the request still flows.
    await jbff.set_expiry(handle, time.time() + 3)
    status, _, _ = await jbff.call(browser)
    assert status == 200  # at once: the refresh runs, and fails, in the background
    assert jbff.upstream_tokens() == {f"Bearer {session.access_token}"}
    await asyncio.wait_for(jbff.api.arrived.wait(), 5)
    await jbff.app[STORE].wait_for_unlock(handle, 5)  # that refresh is over
    assert jbff.api.refresh_requests >= 1
    await jbff.set_expiry(handle, time.time() - 1)
    status, body, headers = await jbff.call(browser)
    assert status == 503
    assert headers["Retry-After"] == "1"  # what is left of the first backoff
    assert body["error"] == "refresh_unavailable"
    assert await jbff.load(handle) is not None  # an outage ends no session
    jbff.api.down = False
    jbff.clock.advance(1)  # the client came back after Retry-After
    status, _, _ = await jbff.call(browser)
    assert status == 200
    assert jbff.api.refresh_grants == 1


async def test_a_slow_api_is_joined_by_every_waiting_request(jbff: JsonBff) -> None:
    browser, handle, _ = await logged_in(jbff)
    await jbff.set_expiry(handle, time.time() - 1)
    jbff.api.arrived.clear()
    jbff.api.release.clear()
    calls = [asyncio.create_task(jbff.call(browser)) for _ in range(20)]
    await asyncio.wait_for(jbff.api.arrived.wait(), 5)
    jbff.api.release.set()
    results = await asyncio.gather(*calls)
    assert [status for status, _, _ in results] == [200] * 20
    assert jbff.api.refresh_requests == 1


async def test_logout_calls_the_apis_logout_and_ends_the_session(jbff: JsonBff) -> None:
    browser, handle, session = await logged_in(jbff)
    async with browser.post(jbff.url + "/auth/logout", headers={"X-CSRF": "1"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["logout_url"] == jbff.url + "/"
    assert jbff.api.logouts == 1
    assert await jbff.load(handle) is None
    # The API revoked the grant: the refresh token is worthless now.
    await kill_check(jbff, session)


async def kill_check(jbff: JsonBff, session: Session) -> None:
    async with aiohttp.ClientSession() as direct:
        if isinstance(jbff.api, FakeTokenIdp):
            body = {
                "grantType": "refresh_token",
                "clientId": "tokengate-spa",
                "refreshToken": session.refresh_token,
            }
            async with direct.post(jbff.api.url + "/token", json=body) as resp:
                assert resp.status == 400
        else:
            me = str(jbff.settings.routes[1].upstream) + "/User/Me"
            headers = {"Authorization": f"Bearer {session.access_token}"}
            async with direct.get(me, headers=headers) as resp:
                assert resp.status == 401
