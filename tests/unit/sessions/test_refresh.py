"""Refresh under a lock, with the memory store and a scripted dialect (unit level).

The same properties are proven against the real IdP and Redis in tests/integration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

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
async def parts() -> AsyncIterator[
    tuple[MemorySessionStore, ScriptedIdp, Refresher, SessionHandle]
]:
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
    yield store, idp, refresher, handle
    idp.release.set()
    await refresher.aclose()  # a refresh left in the background lands


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
    # The rest of the backoff after one failure (refresh.backoff_first_s, 1 s, jittered).
    assert raised.value.headers()["Retry-After"] == "1"


async def test_idp_timeout_is_enforced(parts: Parts) -> None:
    store, idp, refresher, handle = parts
    idp.release.clear()  # never answers; the 1 s timeout must end the call
    with pytest.raises(RefreshUnavailableError):
        await refresher.ensure_fresh(handle, await load(store, handle))


async def test_forced_refresh_after_upstream_rejection(parts: Parts) -> None:
    store, idp, _, handle = parts
    clock = Clock(time.time())
    refresher = Refresher(store, idp, RefreshSettings(ahead_s=60, timeout_s=1), Metrics(), clock)
    fresh = await refresher.ensure_fresh(handle, await load(store, handle))
    clock.now += 30  # refresh.forced_min_interval_s after the refresh that obtained it
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
        assert raised.value.headers() == {"Retry-After": "1"}  # the backoff, not retry_after_s
        await refresher.aclose()


class Clock:
    """Wall time that moves only when a test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ClockedIdp:
    """Counts refresh grants where they arrive; its tokens live an hour on ``clock``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls = 0

    async def refresh(self, session: Session) -> TokenSet:
        self.calls += 1
        await asyncio.sleep(0)  # an IdP answers later: concurrent callers overlap
        return TokenSet(
            access_token=f"access-{self.calls}",
            expires_at=self.clock() + 3600,
            refresh_token=f"refresh-{self.calls}",
        )


WINDOW_S = 30.0


async def rejected_session(clock: Clock) -> tuple[MemorySessionStore, SessionHandle, Session]:
    """A session whose valid access token came from the login (never refreshed)."""
    store = MemorySessionStore(SessionSettings(store="memory"), clock=clock)
    handle = derive_handle(secrets.token_bytes(32))
    await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=clock() + 3600,
            refresh_token="refresh-0",
            created_at=clock(),
        ),
    )
    return store, handle, await load(store, handle)


def refresher_on(store: MemorySessionStore, idp: ClockedIdp, clock: Clock) -> Refresher:
    settings = RefreshSettings(ahead_s=60, timeout_s=1, forced_min_interval_s=WINDOW_S)
    return Refresher(store, idp, settings, Metrics(), clock)


async def test_a_token_rejected_again_within_the_window_is_not_refreshed_again() -> None:
    clock = Clock(1_000_000.0)
    store, handle, session = await rejected_session(clock)
    idp = ClockedIdp(clock)
    refresher = refresher_on(store, idp, clock)
    # An upstream that answers 401 to every token: each request forces with what it holds.
    renewed = await refresher.ensure_fresh(handle, session, force=True)
    assert (renewed.access_token, renewed.refreshed_at) == ("access-1", clock.now)
    for _ in range(30):
        clock.now += (WINDOW_S - 0.001) / 30
        held = await refresher.ensure_fresh(handle, await load(store, handle), force=True)
        assert held.access_token == "access-1"
    assert idp.calls == 1
    clock.now += 0.001  # the token is now as old as the window: one more refresh
    assert (await refresher.ensure_fresh(handle, held, force=True)).access_token == "access-2"
    assert idp.calls == 2


async def test_concurrent_forced_refreshes_of_one_rejected_token_make_one_grant() -> None:
    clock = Clock(1_000_000.0)
    store, handle, session = await rejected_session(clock)
    idp = ClockedIdp(clock)
    # Two processes on one store: each has its own single flight; the lock joins them.
    replicas = [refresher_on(store, idp, clock), refresher_on(store, idp, clock)]
    results = await asyncio.gather(
        *(replicas[n % 2].ensure_fresh(handle, session, force=True) for n in range(30))
    )
    assert idp.calls == 1
    assert {r.access_token for r in results} == {"access-1"}


async def test_a_session_stored_without_refreshed_at_may_be_refreshed_once() -> None:
    # Sealed by a release before refreshed_at existed: it reads as never refreshed.
    clock = Clock(1_000_000.0)
    store, handle, session = await rejected_session(clock)
    legacy = dict(json.loads(session.to_json()))
    del legacy["refreshed_at"]
    assert Session.from_json(json.dumps(legacy).encode(), session.version) == session
    idp = ClockedIdp(clock)
    refresher = refresher_on(store, idp, clock)
    await refresher.ensure_fresh(handle, session, force=True)
    await refresher.ensure_fresh(handle, await load(store, handle), force=True)
    assert idp.calls == 1


def test_a_session_field_from_a_later_release_is_ignored() -> None:
    session = Session(subject="alice", access_token="a", access_expires_at=1.0, created_at=1.0)
    later = {**json.loads(session.to_json()), "field_of_a_later_release": [1, 2]}
    assert Session.from_json(json.dumps(later).encode(), 3) == dataclasses.replace(
        session, version=3
    )


# Each step: how far the clock moves, how many requests (concurrent) are refused with the
# token the session holds, and how many with a token it held before.
STEPS = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=2 * WINDOW_S),
        st.integers(min_value=1, max_value=4),
        st.integers(min_value=0, max_value=2),
    ),
    min_size=1,
    max_size=12,
)


@given(steps=STEPS)
async def test_forced_refreshes_make_one_grant_per_window_whatever_the_requests(
    steps: list[tuple[float, int, int]],
) -> None:
    clock = Clock(1_000_000.0)
    store, handle, first = await rejected_session(clock)
    idp = ClockedIdp(clock)
    replicas = [refresher_on(store, idp, clock), refresher_on(store, idp, clock)]
    grants_expected = 0
    last_grant_at = first.refreshed_at  # 0.0: the login's token may be refreshed at once
    older: Session | None = None
    for advance_s, current_callers, stale_callers in steps:
        clock.now += advance_s
        current = await load(store, handle)
        callers = [current] * current_callers + ([older] * stale_callers if older else [])
        results = await asyncio.gather(
            *(
                replicas[n % 2].ensure_fresh(handle, seen, force=True)
                for n, seen in enumerate(callers)
            )
        )
        if clock.now - last_grant_at >= WINDOW_S:
            grants_expected += 1
            last_grant_at = clock.now
        assert idp.calls == grants_expected
        latest = await load(store, handle)
        assert {r.access_token for r in results} == {latest.access_token}
        if latest.access_token != current.access_token:
            older = current
