"""Refresh under a lock, with the memory store and a scripted dialect (unit level).

The same properties are proven against the real IdP and Redis in tests/integration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.errors import RefreshUnavailableError, SessionExpiredError
from gateway.idp.discovery import Discovery
from gateway.idp.oauth2 import OAuth2Client
from gateway.idp.tokens import IdpUnavailable, RefreshRejected, TokenSet
from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session, SessionHandle
from gateway.sessions.refresh import Refresher
from gateway.settings import OidcSettings, RefreshSettings, SessionSettings


class ScriptedIdp:
    """Counts refresh calls where they arrive; holds them until released; rotates tokens."""

    def __init__(self) -> None:
        self.calls = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.outcome: Callable[[], None] = lambda: None
        self.rotate = True

    async def refresh(self, session: Session) -> TokenSet:
        self.calls += 1
        self.arrived.set()
        await self.release.wait()
        self.outcome()
        return TokenSet(
            access_token=f"access-{self.calls}",
            expires_at=time.time() + 300,
            refresh_token=f"refresh-{self.calls}" if self.rotate else None,
        )


@pytest.fixture
async def parts() -> tuple[MemorySessionStore, ScriptedIdp, Refresher, SessionHandle]:
    store = MemorySessionStore(SessionSettings(store="memory"))
    idp = ScriptedIdp()
    refresher = Refresher(store, idp, RefreshSettings(ahead_s=60, timeout_s=1), Metrics())
    handle = derive_handle(b"k" * 32)
    await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=time.time() - 1,
            refresh_token="refresh-0",
            created_at=time.time(),
        ),
    )
    return store, idp, refresher, handle


Parts = tuple[MemorySessionStore, ScriptedIdp, Refresher, SessionHandle]


async def load(store: MemorySessionStore, handle: SessionHandle) -> Session:
    session = await store.load(handle)
    assert session is not None
    return session


async def test_concurrent_callers_share_one_refresh(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    stale = await load(store, handle)
    results = await asyncio.gather(*(refresher.ensure_fresh(handle, stale) for _ in range(200)))
    assert idp.calls == 1
    assert {r.access_token for r in results} == {"access-1"}
    stored = await load(store, handle)
    assert stored.refresh_token == "refresh-1"
    assert stored.version == stale.version + 1


async def test_fresh_token_is_not_refreshed(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    fresh = await refresher.ensure_fresh(handle, await load(store, handle))
    assert await refresher.ensure_fresh(handle, fresh) is fresh
    assert idp.calls == 1


async def test_caller_that_hangs_up_does_not_lose_the_rotated_token(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    idp.release.clear()
    stale = await load(store, handle)
    waiter = asyncio.ensure_future(refresher.ensure_fresh(handle, stale))
    await idp.arrived.wait()
    waiter.cancel()  # the client disconnected mid-refresh
    with pytest.raises(asyncio.CancelledError):
        await waiter
    idp.release.set()
    await refresher.aclose()  # the flight lands
    stored = await load(store, handle)
    assert stored.refresh_token == "refresh-1"
    again = await refresher.ensure_fresh(handle, stored)
    assert again.access_token == "access-1"
    assert idp.calls == 1


async def test_provider_without_rotation_keeps_the_refresh_token(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    idp.rotate = False
    await refresher.ensure_fresh(handle, await load(store, handle))
    assert (await load(store, handle)).refresh_token == "refresh-0"


async def test_invalid_grant_ends_the_session(parts: Parts) -> None:
    store, idp, refresher, handle = parts

    def reject() -> None:
        raise RefreshRejected("invalid_grant")

    idp.outcome = reject
    with pytest.raises(SessionExpiredError):
        await refresher.ensure_fresh(handle, await load(store, handle))
    assert await store.load(handle) is None


async def test_idp_down_serves_a_still_valid_token(parts: Parts) -> None:
    store, idp, refresher, handle = parts

    def down() -> None:
        raise IdpUnavailable("503")

    idp.outcome = down
    session = await load(store, handle)
    # Valid for 30 s more but inside ahead_s (60): refresh is attempted, fails, still served.
    valid = await store.save(
        handle,
        Session(**{**_fields(session), "access_expires_at": time.time() + 30}),
    )
    assert valid is not None
    assert (await refresher.ensure_fresh(handle, valid)).access_token == "access-0"
    expired = await store.save(
        handle, Session(**{**_fields(valid), "access_expires_at": time.time() - 1})
    )
    assert expired is not None
    with pytest.raises(RefreshUnavailableError) as raised:
        await refresher.ensure_fresh(handle, expired)
    assert raised.value.headers()["Retry-After"] == "5"


async def test_idp_timeout_is_enforced(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    idp.release.clear()  # never answers; the 1 s timeout must end the call
    with pytest.raises(RefreshUnavailableError):
        await refresher.ensure_fresh(handle, await load(store, handle))


async def test_forced_refresh_after_upstream_rejection(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    fresh = await refresher.ensure_fresh(handle, await load(store, handle))
    forced = await refresher.ensure_fresh(handle, fresh, force=True)
    assert forced.access_token == "access-2"
    # A second forced refresh with the already-replaced token does not refresh again.
    assert (await refresher.ensure_fresh(handle, fresh, force=True)).access_token == "access-2"
    assert idp.calls == 2


async def test_second_process_waits_for_the_lock_then_reuses_the_result(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    other = Refresher(store, idp, RefreshSettings(ahead_s=60, timeout_s=1), Metrics())
    idp.release.clear()
    stale = await load(store, handle)
    first = asyncio.ensure_future(refresher.ensure_fresh(handle, stale))
    await idp.arrived.wait()
    second = asyncio.ensure_future(other.ensure_fresh(handle, stale))
    idp.release.set()
    results = await asyncio.gather(first, second)
    assert [r.access_token for r in results] == ["access-1", "access-1"]
    assert idp.calls == 1


def _fields(session: Session) -> dict[str, object]:
    return {name: getattr(session, name) for name in Session.__slots__}


@pytest.mark.parametrize("discovery_status", [500, 404, 200])
async def test_a_discovery_failure_during_refresh_is_transient(
    aiohttp_server: Callable[..., Awaitable[TestServer]], discovery_status: int
) -> None:
    # The real OAuth 2.0 dialect, whose discovery document cannot be had (an error status,
    # or 200 with a document that is not one): a session with a valid token is served, an
    # expired one gets 503 refresh_unavailable with Retry-After, never the 502 of IdpError.
    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"not": "a discovery document"}, status=discovery_status)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    server = await aiohttp_server(app, host="127.0.0.1")
    oidc = OidcSettings(issuer=str(server.make_url("")).rstrip("/"), client_id="bff")
    settings = RefreshSettings(ahead_s=60, timeout_s=1, retry_after_s=7)
    async with aiohttp.ClientSession() as http:
        client = OAuth2Client(oidc, settings, Discovery(oidc, http), http, Metrics())
        store = MemorySessionStore(SessionSettings(store="memory"))
        refresher = Refresher(store, client, settings, Metrics())
        handle = derive_handle(b"d" * 32)
        now = time.time()
        valid = Session(
            subject="alice",
            access_token="still-valid",
            access_expires_at=now + 30,  # inside refresh-ahead: a refresh is attempted
            refresh_token="refresh-0",
            created_at=now,
        )
        await store.create(handle, valid)
        served = await refresher.ensure_fresh(handle, await load(store, handle))
        assert served.access_token == "still-valid"
        expired = await store.save(
            handle, dataclasses.replace(await load(store, handle), access_expires_at=now - 1)
        )
        assert expired is not None
        with pytest.raises(RefreshUnavailableError) as raised:
            await refresher.ensure_fresh(handle, expired)
        assert raised.value.headers() == {"Retry-After": "7"}
        await refresher.aclose()
