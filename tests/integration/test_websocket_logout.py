"""A WebSocket ends with its session on every replica: two tokengates on one real
redis-server, the real IdP, the socket held by one replica and the session ended on the
other (logout, back-channel logout). A write to the session (a refresh) keeps the socket
open; without the invalidation feed the replica holding it finds the end by polling.

Every close is awaited (bounded by a timeout), never slept for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway.app import STORE, build_app
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import SessionHandle
from gateway.sessions.redis_store import RedisSessionStore
from gateway.settings import parse_settings
from tests.integration.conftest import Bff, bff_config, free_port
from tests.support.feed import feed_of, hearing, wait_subscribed
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration

POLICY_VIOLATION = aiohttp.WSCloseCode.POLICY_VIOLATION
FEED_CLOSE_S = 2.0  # with the feed, an end arrives in milliseconds; a poll takes >= 4 s
POLL_CLOSE_S = 10.0  # without it, within one poll (at most 5 s)


@dataclasses.dataclass
class Replica:
    url: str
    app: web.Application


async def start_replica(bff: Bff, redis_url: str, **session: Any) -> tuple[Replica, TestServer]:
    """A second tokengate for the same site and Redis, with a WebSocket route."""
    port = free_port()
    upstream_url = str(bff.settings.routes[0].upstream)
    config = bff_config(port, bff.idp, redis_url, upstream_url)
    config["public_url"] = bff.url  # one site, several replicas behind it
    config["session"] = {**config["session"], **session}
    config["routes"] = [
        {"prefix": "/ws", "upstream": upstream_url, "auth": "session", "websocket": True}
    ]
    app = build_app(parse_settings(config))
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    store = app[STORE]
    assert isinstance(store, RedisSessionStore)
    if store.feed is not None:
        await wait_subscribed(store.feed, timeout_s=5.0)
    return Replica(f"http://127.0.0.1:{port}", app), server


@pytest.fixture
async def replica(bff: Bff, redis_server: RedisServerProcess) -> AsyncIterator[Replica]:
    started, server = await start_replica(bff, redis_server.url)
    yield started
    await server.close()


@pytest.fixture
async def polling_replica(bff: Bff, redis_server: RedisServerProcess) -> AsyncIterator[Replica]:
    # local_cache_s 0: no local cache, so no invalidation feed either.
    started, server = await start_replica(bff, redis_server.url, local_cache_s=0)
    yield started
    await server.close()


def session_cookie(bff: Bff, browser: aiohttp.ClientSession) -> tuple[str, SessionHandle]:
    for cookie in browser.cookie_jar:
        if cookie.key == bff.settings.session.cookie_name and cookie.value:
            secret = parse_secret(cookie.value)
            assert secret is not None
            return f"{cookie.key}={cookie.value}", derive_handle(secret)
    raise AssertionError("no session cookie")


async def open_socket(
    client: aiohttp.ClientSession, replica: Replica, cookie: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect(
        replica.url + "/ws/chat", headers={"Cookie": cookie, "X-CSRF": "1"}
    )
    await ws.send_str("hi")
    assert await ws.receive_str() == "echo:hi"
    return ws


async def close_code_of(ws: aiohttp.ClientWebSocketResponse, within_s: float) -> int | None:
    async with asyncio.timeout(within_s):
        message = await ws.receive()
    assert message.type == WSMsgType.CLOSE, message
    return ws.close_code


async def test_logout_on_one_replica_closes_the_websocket_held_on_another(
    bff: Bff, replica: Replica
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    cookie, _ = session_cookie(bff, browser)
    async with aiohttp.ClientSession() as client:
        ws = await open_socket(client, replica, cookie)
        started = time.monotonic()
        status, _ = await bff.api(browser, "/auth/logout", method="POST")
        assert status == 200
        assert await close_code_of(ws, FEED_CLOSE_S) == POLICY_VIOLATION
        assert time.monotonic() - started < FEED_CLOSE_S
        # The cookie is dead on the replica too: no new socket.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(
                replica.url + "/ws/chat", headers={"Cookie": cookie, "X-CSRF": "1"}
            )
        assert refused.value.status == 401


async def test_back_channel_logout_closes_the_websocket_on_every_replica(
    bff: Bff, replica: Replica
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    cookie, _ = session_cookie(bff, browser)
    async with aiohttp.ClientSession() as client:
        ws = await open_socket(client, replica, cookie)
        # The IdP posts its logout token to the first replica only.
        result = await bff.idp.backchannel_logout("alice")
        assert result["deliveries"]
        assert all(delivery["ok"] for delivery in result["deliveries"])
        assert await close_code_of(ws, FEED_CLOSE_S) == POLICY_VIOLATION


async def test_a_refresh_on_another_replica_keeps_the_websocket_open(
    bff: Bff, replica: Replica
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    cookie, handle = session_cookie(bff, browser)
    store = replica.app[STORE]
    assert isinstance(store, RedisSessionStore)
    async with aiohttp.ClientSession() as client:
        ws = await open_socket(client, replica, cookie)
        session = await bff.app[STORE].load(handle)
        assert session is not None
        with hearing(feed_of(store)) as news:
            written = await bff.app[STORE].save(
                handle, dataclasses.replace(session, refreshed_at=time.time())
            )
            assert written is not None
            # The write reached the replica holding the socket; it looked and found it.
            await news.invalidation(handle.storage_id, timeout_s=5.0)
        for n in range(3):
            await ws.send_str(f"after-{n}")
            assert await ws.receive_str() == f"echo:after-{n}"
        status, _ = await bff.api(browser, "/auth/logout", method="POST")
        assert status == 200
        assert await close_code_of(ws, FEED_CLOSE_S) == POLICY_VIOLATION


async def test_without_the_feed_a_logout_reaches_the_websocket_by_polling(
    bff: Bff, polling_replica: Replica
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    cookie, _ = session_cookie(bff, browser)
    async with aiohttp.ClientSession() as client:
        ws = await open_socket(client, polling_replica, cookie)
        status, _ = await bff.api(browser, "/auth/logout", method="POST")
        assert status == 200
        assert await close_code_of(ws, POLL_CLOSE_S) == POLICY_VIOLATION
