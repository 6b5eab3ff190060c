"""A WebSocket lives only as long as its principal: a session's end, a token's expiry.

One process, the memory store: a logout, an end by subject (what back-channel logout
does), the absolute timeout and a Bearer token's ``exp`` close an open socket with 1008 on
both sides. Every close is awaited, never slept for. Two replicas sharing a real Redis are
in tests/integration/test_websocket_logout.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import STORE, build_app
from gateway.sessions.cookie import encode_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session, SessionHandle
from gateway.settings import SessionSettings, parse_settings
from tests.conftest import AiohttpClient, AiohttpServer, base_config
from tests.fakes.issuer import FakeIssuer

COOKIE = "__Host-tokengate"
CLOSE_WAIT_S = 5.0  # a bound on the await, never a sleep
POLICY_VIOLATION = aiohttp.WSCloseCode.POLICY_VIOLATION


@dataclass
class EchoUpstream:
    """A WebSocket upstream that echoes and records how each socket was closed."""

    close_codes: list[int | None] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[str] = field(default_factory=list)

    def web_app(self) -> web.Application:
        async def socket(request: web.Request) -> web.WebSocketResponse:
            self.tokens.append(request.headers.get("Authorization", ""))
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await ws.send_str(f"echo:{message.data}")
            self.close_codes.append(ws.close_code)
            self.closed.set()
            return ws

        app = web.Application()
        app.router.add_get("/{tail:.*}", socket)
        return app


@dataclass
class Parts:
    gateway: TestClient[Any, Any]
    store: MemorySessionStore
    upstream: EchoUpstream
    issuer: FakeIssuer


@pytest.fixture
async def parts(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, issuer: FakeIssuer
) -> Parts:
    upstream = EchoUpstream()
    server: TestServer = await aiohttp_server(upstream.web_app(), host="127.0.0.1")
    upstream_url = str(server.make_url("")).rstrip("/")
    config = base_config(issuer.url, upstream_url)
    config["oidc"]["client_id"] = "spa"
    config["session"] = {"store": "memory"}
    config["routes"].append(
        {"prefix": "/live", "upstream": upstream_url, "auth": "session", "websocket": True}
    )
    app = build_app(parse_settings(config))
    gateway = await aiohttp_client(app)
    store = app[STORE]
    assert isinstance(store, MemorySessionStore)
    return Parts(gateway, store, upstream, issuer)


async def new_session(store: MemorySessionStore, **fields: Any) -> tuple[str, SessionHandle]:
    """A live session in the store, and the cookie header that carries it."""
    secret = secrets.token_bytes(32)
    handle = derive_handle(secret)
    now = time.time()
    session = Session(
        subject=fields.pop("subject", "alice"),
        access_token=f"access-{secrets.token_hex(4)}",
        access_expires_at=now + 3600,
        refresh_token="refresh-0",
        created_at=fields.pop("created_at", now),
        **fields,
    )
    await store.create(handle, session)
    return f"{COOKIE}={encode_secret(secret)}", handle


@dataclass
class Live:
    ws: aiohttp.ClientWebSocketResponse
    cookie: str
    handle: SessionHandle


@pytest.fixture
async def live(parts: Parts) -> AsyncIterator[Live]:
    """An open, working WebSocket of a session (alice's)."""
    cookie, handle = await new_session(parts.store)
    async with parts.gateway.ws_connect(
        "/live/feed", headers={"Cookie": cookie, "X-CSRF": "1"}
    ) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
        yield Live(ws, cookie, handle)


async def close_code_of(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Await the close frame the gateway sends (bounded, never slept for)."""
    async with asyncio.timeout(CLOSE_WAIT_S):
        message = await ws.receive()
    assert message.type == WSMsgType.CLOSE, message
    return ws.close_code


async def upstream_close_code(upstream: EchoUpstream) -> int | None:
    async with asyncio.timeout(CLOSE_WAIT_S):
        await upstream.closed.wait()
    return upstream.close_codes[-1]


async def test_logout_closes_the_sessions_websocket_with_1008_on_both_sides(
    parts: Parts, live: Live
) -> None:
    ws = live.ws
    other_cookie, _ = await new_session(parts.store, subject="bob")
    async with parts.gateway.ws_connect(
        "/live/feed", headers={"Cookie": other_cookie, "X-CSRF": "1"}
    ) as other:
        resp = await parts.gateway.post(
            "/auth/logout", headers={"Cookie": live.cookie, "X-CSRF": "1"}
        )
        assert resp.status == 200
        assert await close_code_of(ws) == POLICY_VIOLATION
        assert await upstream_close_code(parts.upstream) == POLICY_VIOLATION
        # Another session's socket is not touched.
        await other.send_str("still here")
        assert await other.receive_str() == "echo:still here"


async def test_ending_every_session_of_a_subject_closes_its_websockets(
    parts: Parts, live: Live
) -> None:
    # What a back-channel logout does, by subject.
    assert await parts.store.delete_by_subject("alice") == 1
    assert await close_code_of(live.ws) == POLICY_VIOLATION


async def test_a_write_to_the_session_does_not_close_its_websocket(
    parts: Parts, live: Live
) -> None:
    ws, handle = live.ws, live.handle
    session = await parts.store.load(handle)
    assert session is not None
    refreshed = session.with_tokens(
        access_token="access-new",
        access_expires_at=time.time() + 3600,
        refresh_token="refresh-1",
        id_token=None,
        refreshed_at=time.time(),
    )
    assert await parts.store.save(handle, refreshed) is not None  # a refresh wakes the watcher
    for n in range(3):
        await ws.send_str(f"after-{n}")
        assert await ws.receive_str() == f"echo:after-{n}"
    assert await parts.store.delete(handle)
    assert await close_code_of(ws) == POLICY_VIOLATION


async def test_the_absolute_timeout_closes_the_websocket(parts: Parts) -> None:
    absolute_s = SessionSettings(store="memory").absolute_timeout_s
    started = time.time()
    # Created long ago: one second of its absolute lifetime is left.
    cookie, _ = await new_session(parts.store, created_at=started - absolute_s + 1.0)
    async with parts.gateway.ws_connect(
        "/live/feed", headers={"Cookie": cookie, "X-CSRF": "1"}
    ) as ws:
        assert await close_code_of(ws) == POLICY_VIOLATION
    assert time.time() - started >= 0.9


async def test_a_bearer_websocket_closes_when_its_token_expires(parts: Parts) -> None:
    started = time.time()
    token = parts.issuer.mint(exp=int(started) + 2)
    async with parts.gateway.ws_connect(
        "/ws/chat", headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        assert await close_code_of(ws) == POLICY_VIOLATION
    assert time.time() >= int(started) + 2 - 0.1


async def test_a_closed_websocket_leaves_no_watcher_behind(parts: Parts, live: Live) -> None:
    assert parts.store.watched == 1
    await live.ws.close()
    async with asyncio.timeout(CLOSE_WAIT_S):
        await parts.upstream.closed.wait()  # the gateway's handler has let go of both sides
    assert parts.store.watched == 0


async def test_a_browser_websocket_needs_our_origin_not_the_csrf_header(parts: Parts) -> None:
    # Browsers cannot add a header to a WebSocket handshake, but always send its Origin,
    # which no page can choose: our Origin is the CSRF check there (CSWSH).
    cookie, _ = await new_session(parts.store)
    async with parts.gateway.ws_connect(
        "/live/feed", headers={"Cookie": cookie, "Origin": "http://localhost:8080"}
    ) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
    for origin in ("https://evil.example", None):
        headers = {"Cookie": cookie} | ({"Origin": origin} if origin else {})
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await parts.gateway.ws_connect("/live/feed", headers=headers)
        assert refused.value.status == 403
