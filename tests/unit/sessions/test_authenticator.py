"""The session authenticator's principal memo (unit level, a store that hands out objects).

A session served from the local cache is the same object on every request; its principal
is built once and handed out again until the store answers with another object.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.errors import CsrfError, SessionExpiredError
from gateway.idp.tokens import TokenSet
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.routing import Route
from gateway.sessions.authenticator import SessionAuthenticator
from gateway.sessions.cookie import SessionCookies, encode_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session, SessionHandle
from gateway.sessions.refresh import Refresher
from gateway.settings import CsrfSettings, RefreshSettings, RouteSettings, SessionSettings

SECRET = b"s" * 32
SETTINGS = SessionSettings(store="memory")


class HandingStore(MemorySessionStore):
    """Loads answer with the object in ``sessions`` itself (as the local cache does)."""

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self.sessions: dict[str, Session] = {}

    def hand_out(self, secret: bytes, session: Session | None) -> None:
        storage_id = derive_handle(secret).storage_id
        if session is None:
            del self.sessions[storage_id]
        else:
            self.sessions[storage_id] = session

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        return self.sessions.get(handle.storage_id)


class NoIdp:
    async def refresh(self, session: Session) -> TokenSet:
        raise AssertionError("a fresh session is never refreshed")


def a_session(access_token: str, scopes: tuple[str, ...] = ("read",)) -> Session:
    return Session(
        subject="alice",
        access_token=access_token,
        access_expires_at=time.time() + 300,
        scopes=scopes,
        created_at=time.time(),
    )


Parts = tuple[HandingStore, SessionAuthenticator]


def authenticator_of(store: MemorySessionStore, refresher: Refresher) -> SessionAuthenticator:
    return SessionAuthenticator(
        SessionCookies(SETTINGS),
        store,
        refresher,
        CsrfSettings(),
        "https://app.example",
        principals_kept=2,
        absolute_timeout_s=SETTINGS.absolute_timeout_s,
    )


@pytest.fixture
def parts() -> Parts:
    store = HandingStore(SETTINGS)
    return store, authenticator_of(store, Refresher(store, NoIdp(), RefreshSettings(), Metrics()))


ROUTE = Route.from_settings(
    RouteSettings(prefix="/api", upstream="http://127.0.0.1:1", name="api", auth="session")
)


async def authenticate(authenticator: SessionAuthenticator, secret: bytes) -> Principal:
    cookie = f"{SETTINGS.cookie_name}={encode_secret(secret)}"
    request = make_mocked_request("GET", "/api", headers={"Cookie": cookie, "X-CSRF": "1"})
    return await authenticator.authenticate(request, ROUTE)


async def test_an_unchanged_session_gives_the_same_principal(parts: Parts) -> None:
    store, authenticator = parts
    store.hand_out(SECRET, a_session("access-1"))
    first = await authenticate(authenticator, SECRET)
    assert await authenticate(authenticator, SECRET) is first
    assert first.access_token == "access-1"
    assert first.scopes == frozenset({"read"})
    assert first.via == "session"
    assert first.handle == derive_handle(SECRET)


async def test_a_changed_session_gives_a_new_principal(parts: Parts) -> None:
    store, authenticator = parts
    store.hand_out(SECRET, a_session("access-1"))
    first = await authenticate(authenticator, SECRET)
    store.hand_out(SECRET, a_session("access-2", scopes=("read", "write")))  # refreshed
    second = await authenticate(authenticator, SECRET)
    assert (second.access_token, second.scopes) == ("access-2", frozenset({"read", "write"}))
    assert first.access_token == "access-1"


async def test_an_ended_session_is_not_answered_from_the_memo(parts: Parts) -> None:
    store, authenticator = parts
    store.hand_out(SECRET, a_session("access-1"))
    await authenticate(authenticator, SECRET)
    store.hand_out(SECRET, None)  # logged out on another replica
    with pytest.raises(SessionExpiredError):
        await authenticate(authenticator, SECRET)


async def test_each_session_has_its_own_principal_and_the_memo_is_bounded(parts: Parts) -> None:
    store, authenticator = parts  # principals_kept=2
    secrets = [bytes([n + 1]) * 32 for n in range(3)]
    for n, secret in enumerate(secrets):
        store.hand_out(secret, a_session(f"access-{n}"))
    first = [await authenticate(authenticator, secret) for secret in secrets]
    assert [p.access_token for p in first] == ["access-0", "access-1", "access-2"]
    assert [p.handle for p in first] == [derive_handle(secret) for secret in secrets]
    # The third principal found the memo full and emptied it: the first is built again
    # (equal, not the same object), where an unbounded memo would hand out the old one.
    again = await authenticate(authenticator, secrets[0])
    assert again == first[0]
    assert again is not first[0]


class CopyingStore(MemorySessionStore):
    """A local copy (``cached``) beside the store's own answer (``load``), as the Redis
    store's local cache is; counts the loads, which need an await and a deadline."""

    def __init__(self, settings: SessionSettings) -> None:
        super().__init__(settings)
        self.copies: dict[str, Session] = {}
        self.loads = 0

    def cached(self, handle: SessionHandle) -> Session | None:
        return self.copies.get(handle.storage_id)

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        self.loads += 1
        return await super().load(handle, cached=cached)


class CountingIdp:
    def __init__(self) -> None:
        self.refreshed = 0

    async def refresh(self, session: Session) -> TokenSet:
        self.refreshed += 1
        return TokenSet(access_token="renewed", expires_at=time.time() + 300)


async def test_a_fresh_local_copy_answers_without_a_load_and_a_stale_one_is_refreshed() -> None:
    store = CopyingStore(SETTINGS)
    idp = CountingIdp()
    authenticator = authenticator_of(store, Refresher(store, idp, RefreshSettings(), Metrics()))
    storage_id = derive_handle(SECRET).storage_id
    copy = store.copies[storage_id] = a_session("access-1")
    assert (await authenticate(authenticator, SECRET)).access_token == "access-1"
    assert (store.loads, idp.refreshed) == (0, 0)  # the copy, as it was: no store call
    # A copy whose token has expired takes the path that refreshes it and waits (the
    # store has the session too, as Redis would, for the refresh's compare-and-set).
    expired = dataclasses.replace(copy, access_expires_at=time.time() - 1, refresh_token="r")
    store.copies[storage_id] = expired
    await store.create(derive_handle(SECRET), expired)
    principal = await authenticate(authenticator, SECRET)
    assert (idp.refreshed, principal.access_token) == (1, "renewed")
    cookie = f"{SETTINGS.cookie_name}={encode_secret(SECRET)}"
    no_csrf = make_mocked_request("GET", "/api", headers={"Cookie": cookie})
    with pytest.raises(CsrfError):  # the fast path checks CSRF first, as the other does
        await authenticator.authenticate(no_csrf, ROUTE)
