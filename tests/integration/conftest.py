"""Real parts: a redis-server, panva's oidc-provider, and tokengate in front of a fake API.

The IdP and Redis start once per run; each test gets its own tokengate (in this process,
on a real socket) with the IdP's client pointed at it and the IdP's counters reset, so
tests count refresh grants where they happen: at the IdP.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import build_app
from gateway.settings import Settings, parse_settings
from tests.fakes.upstream import FakeUpstream
from tests.support.idp import (
    CLIENT_SECRET,
    DEFAULT_RESOURCE,
    OidcProviderProcess,
    complete_login,
    default_idp_config,
    make_client_key,
)
from tests.support.redis_server import RedisServerProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeClock:
    """Wall time plus an offset: tests jump past an access token's expiry without waiting."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pkjwt_key() -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    return make_client_key("tokengate-pkjwt")


@pytest.fixture(scope="session")
def idp(pkjwt_key: tuple[rsa.RSAPrivateKey, dict[str, Any]]) -> Iterator[OidcProviderProcess]:
    config = default_idp_config(access_token_ttl=30, pkjwt_jwks=pkjwt_key[1])
    provider = OidcProviderProcess(config).start()
    yield provider
    provider.stop()


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def bff_config(
    port: int, idp: OidcProviderProcess, redis_url: str, upstream_url: str, **overrides: Any
) -> dict[str, Any]:
    public_url = f"http://127.0.0.1:{port}"
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "public_url": public_url,
        "oidc": {
            "issuer": idp.issuer,
            "client_id": "tokengate",
            "client_secret": CLIENT_SECRET,
            "audience": DEFAULT_RESOURCE,
            "scopes": ["openid", "profile", "email", "offline_access", "api.read"],
        },
        "refresh": {"ahead_s": 5, "timeout_s": 2},
        "session": {
            "store": "redis",
            "redis_url": redis_url,
            "cookie_name": "tokengate",
            "cookie_secure": False,
        },
        "limits": {"shutdown_delay_s": 0},
        "routes": [
            {
                "prefix": "/api",
                "upstream": upstream_url,
                "auth": "session_or_bearer",
                "scopes": ["api.read"],
            },
            {"prefix": "/session-only", "upstream": upstream_url, "auth": "session"},
            {"prefix": "/", "upstream": upstream_url, "auth": "none"},
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class Bff:
    """One tokengate under test, its fake upstream, the IdP and a clock to move."""

    url: str
    app: web.Application
    upstream: FakeUpstream
    idp: OidcProviderProcess
    clock: FakeClock
    settings: Settings
    browsers: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self) -> aiohttp.ClientSession:
        """A cookie-keeping client, like one browser; closed by the fixture."""
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.browsers.append(session)
        return session

    async def login(self, browser: aiohttp.ClientSession, return_to: str = "/app") -> str:
        """Log in through the IdP's real forms; returns where the callback redirected."""
        start = f"{self.url}/auth/login?return_to={return_to}"
        callback = await complete_login(browser, start)
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            return resp.headers["Location"]

    async def api(
        self,
        browser: aiohttp.ClientSession,
        path: str = "/api/me",
        method: str = "GET",
        **kwargs: Any,
    ) -> tuple[int, Any]:
        headers = {"X-CSRF": "1", **kwargs.pop("headers", {})}
        async with browser.request(method, self.url + path, headers=headers, **kwargs) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, body


async def start_bff(
    idp: OidcProviderProcess, redis_url: str, **overrides: Any
) -> tuple[Bff, TestServer, TestServer]:
    upstream = FakeUpstream()
    upstream_server = TestServer(upstream.web_app(), host="127.0.0.1")
    await upstream_server.start_server()
    port = free_port()
    settings = parse_settings(
        bff_config(port, idp, redis_url, str(upstream_server.make_url("")).rstrip("/"), **overrides)
    )
    clock = FakeClock()
    app = build_app(settings, clock=clock)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    url = f"http://127.0.0.1:{port}"
    await idp.update_client(
        settings.oidc.client_id,
        redirect_uris=[f"{url}/auth/callback"],
        post_logout_redirect_uris=[f"{url}/"],
        backchannel_logout_uri=f"{url}/auth/backchannel-logout",
    )
    await idp.reset()
    bff = Bff(url, app, upstream, idp, clock, settings)
    return bff, server, upstream_server


@pytest.fixture
async def bff(idp: OidcProviderProcess, redis_server: RedisServerProcess) -> AsyncIterator[Bff]:
    bff, server, upstream_server = await start_bff(idp, redis_server.url)
    yield bff
    for browser in bff.browsers:
        await browser.close()
    await server.close()
    await upstream_server.close()


@pytest.fixture
def pkjwt_pem(pkjwt_key: tuple[rsa.RSAPrivateKey, dict[str, Any]]) -> str:
    return pem(pkjwt_key[0])
