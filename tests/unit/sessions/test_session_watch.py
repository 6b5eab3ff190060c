"""Watching a session until it ends: the waiters registry, and ``wait_ended`` over a store.

The store here is the memory store, counting its loads where they happen; two replicas on
a real Redis are in tests/integration/test_websocket_logout.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import AbstractContextManager

from hypothesis import given
from hypothesis import strategies as st

from gateway.idp.tokens import TokenSet
from gateway.metrics import Metrics
from gateway.sessions.authenticator import SessionAuthenticator
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session, SessionHandle, Waiters
from gateway.sessions.refresh import Refresher
from gateway.settings import CsrfSettings, RefreshSettings, SessionSettings

SETTINGS = SessionSettings(store="memory")
WAIT_S = 5.0  # a bound on awaits, never a sleep


class CountingStore(MemorySessionStore):
    """The memory store, telling each load where it happens."""

    def __init__(self) -> None:
        super().__init__(SETTINGS)
        self.loads = 0
        self.loaded = asyncio.Event()

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        self.loads += 1
        self.loaded.set()
        return await super().load(handle, cached=cached)

    async def next_load(self) -> None:
        self.loaded.clear()
        async with asyncio.timeout(WAIT_S):
            await self.loaded.wait()


class NoIdp:
    async def refresh(self, session: Session) -> TokenSet:
        raise AssertionError("watching never refreshes")


def authenticator_on(store: MemorySessionStore) -> SessionAuthenticator:
    return SessionAuthenticator(
        SessionCookies(SETTINGS),
        store,
        Refresher(store, NoIdp(), RefreshSettings(), Metrics()),
        CsrfSettings(),
        "https://app.example",
        principals_kept=8,
        absolute_timeout_s=SETTINGS.absolute_timeout_s,
    )


async def stored_session(store: MemorySessionStore) -> tuple[SessionHandle, Session]:
    handle = derive_handle(secrets.token_bytes(32))
    session = await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=time.time() + 3600,
            created_at=time.time(),
        ),
    )
    return handle, session


async def test_a_write_wakes_the_watcher_which_reloads_and_watches_on() -> None:
    store = CountingStore()
    handle, session = await stored_session(store)
    watcher = asyncio.ensure_future(authenticator_on(store).wait_ended(handle))
    await store.next_load()
    assert store.watched == 1
    saved = await store.save(
        handle,
        session.with_tokens(
            access_token="access-1",
            access_expires_at=time.time() + 3600,
            refresh_token=None,
            id_token=None,
        ),
    )
    assert saved is not None
    # The write was news: the session is looked at again (the memory store answers at
    # once, so by the time this test runs again the watcher has acted on it)...
    await store.next_load()
    assert not watcher.done()  # ...and, still there, watched on
    assert store.watched == 1
    assert await store.delete(handle)
    async with asyncio.timeout(WAIT_S):
        await watcher
    assert store.watched == 0


async def test_a_session_already_ended_ends_the_wait_at_once() -> None:
    store = CountingStore()
    handle, _ = await stored_session(store)
    await store.delete(handle)
    async with asyncio.timeout(WAIT_S):
        await authenticator_on(store).wait_ended(handle)
    assert store.loads == 1
    assert store.watched == 0


async def test_a_cancelled_watcher_leaves_nothing_behind() -> None:
    store = CountingStore()
    handle, _ = await stored_session(store)
    watchers = [asyncio.ensure_future(authenticator_on(store).wait_ended(handle)) for _ in range(3)]
    while store.loads < 3:
        await store.next_load()
    assert store.watched == 1  # one session, three watchers
    for watcher in watchers:
        watcher.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    assert store.watched == 0


Watch = AbstractContextManager[asyncio.Future[None]]

# Operations on a registry: enter a watch of an id, leave one (the n-th open), wake an id,
# wake all.
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("enter"), st.sampled_from("abc")),
        st.tuples(st.just("leave"), st.integers(min_value=0, max_value=7)),
        st.tuples(st.just("wake"), st.sampled_from("abc")),
        st.tuples(st.just("wake_all"), st.just("")),
    ),
    max_size=40,
)


@given(OPERATIONS)
async def test_a_waiter_is_done_exactly_when_woken_and_leaves_no_entry(
    operations: list[tuple[str, object]],
) -> None:
    waiters = Waiters()
    open_watches: list[tuple[str, asyncio.Future[None], Watch]] = []
    woken: set[int] = set()  # ids (by position in ``seen``) of futures that must be done
    seen: list[asyncio.Future[None]] = []
    for operation, argument in operations:
        if operation == "enter":
            watch: Watch = waiters.waiting(str(argument))
            future = watch.__enter__()
            seen.append(future)
            open_watches.append((str(argument), future, watch))
        elif operation == "leave" and open_watches:
            _, _, left = open_watches.pop(int(str(argument)) % len(open_watches))
            left.__exit__(None, None, None)
        elif operation == "wake":
            woken |= {seen.index(f) for key, f, _ in open_watches if key == argument}
            waiters.wake(str(argument))
        elif operation == "wake_all":
            woken |= {seen.index(f) for _, f, _ in open_watches}
            waiters.wake_all()
        assert [f.done() for f in seen] == [n in woken for n in range(len(seen))]
        assert len(waiters) == len({key for key, _, _ in open_watches})
    for _, _, left in open_watches:
        left.__exit__(None, None, None)
    assert len(waiters) == 0
