"""Refresh that survives failover (unit level): the memory store, a scripted dialect.

A valid token never waits for a refresh or a lock. The same properties are shown against
a real redis-server and the real IdP in tests/integration/test_refresh_resilience.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from gateway.errors import RefreshUnavailableError
from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session, SessionHandle
from gateway.sessions.refresh import Refresher
from gateway.settings import RefreshSettings, SessionSettings
from tests.unit.sessions.test_refresh import ScriptedIdp, load


@dataclasses.dataclass
class Parts:
    store: MemorySessionStore
    idp: ScriptedIdp
    refresher: Refresher
    handle: SessionHandle
    metrics: Metrics

    async def expiring_in(self, seconds: float) -> Session:
        """The stored session, its access token now valid for ``seconds`` more."""
        current = await load(self.store, self.handle)
        saved = await self.store.save(
            self.handle, dataclasses.replace(current, access_expires_at=time.time() + seconds)
        )
        assert saved is not None
        return saved

    def counted(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tokengate_refresh_total", {"result": result}
        )
        return value or 0.0


async def build_parts(**settings: float) -> Parts:
    store = MemorySessionStore(SessionSettings(store="memory"))
    metrics = Metrics()
    idp = ScriptedIdp()
    refresh = RefreshSettings(**{"ahead_s": 60, "timeout_s": 1, **settings})
    handle = derive_handle(b"r" * 32)
    await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=time.time() + 30,  # inside ahead_s (60): a refresh is wanted
            refresh_token="refresh-0",
            created_at=time.time(),
        ),
    )
    return Parts(store, idp, Refresher(store, idp, refresh, metrics), handle, metrics)


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    built = await build_parts()
    yield built
    built.idp.release.set()
    await built.refresher.aclose()


async def loop_turns(count: int = 20) -> None:
    """Let every ready task run a step (a flight that could finish, would)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_valid_token_is_served_at_once_while_its_refresh_runs(parts: Parts) -> None:
    parts.idp.release.clear()  # the IdP holds every refresh until released
    valid = await load(parts.store, parts.handle)
    served = await parts.refresher.ensure_fresh(parts.handle, valid)
    assert served is valid
    await parts.idp.arrived.wait()  # the refresh did start, in the background
    # More requests with the valid token: served at once, joining the one refresh.
    for _ in range(5):
        assert await parts.refresher.ensure_fresh(parts.handle, valid) is valid
    assert parts.idp.calls == 1
    parts.idp.release.set()
    await parts.refresher.aclose()
    assert (await load(parts.store, parts.handle)).access_token == "access-1"


async def test_an_expired_token_waits_for_the_refresh(parts: Parts) -> None:
    parts.idp.release.clear()
    expired = await parts.expiring_in(-1)
    waiting = asyncio.ensure_future(parts.refresher.ensure_fresh(parts.handle, expired))
    await parts.idp.arrived.wait()
    await loop_turns()
    assert not waiting.done()
    parts.idp.release.set()
    assert (await waiting).access_token == "access-1"
    assert parts.idp.calls == 1


async def test_a_token_about_to_expire_waits_for_the_refresh(parts: Parts) -> None:
    parts.idp.release.clear()
    almost = await parts.expiring_in(0.5)  # within the 1 s margin: could expire on the way
    waiting = asyncio.ensure_future(parts.refresher.ensure_fresh(parts.handle, almost))
    await parts.idp.arrived.wait()
    await loop_turns()
    assert not waiting.done()
    parts.idp.release.set()
    assert (await waiting).access_token == "access-1"


async def test_a_forced_refresh_waits_for_the_new_token(parts: Parts) -> None:
    parts.idp.release.clear()
    valid = await load(parts.store, parts.handle)
    forced = asyncio.ensure_future(parts.refresher.ensure_fresh(parts.handle, valid, force=True))
    await parts.idp.arrived.wait()
    await loop_turns()
    assert not forced.done()  # its caller replays with the new token: it must have it
    parts.idp.release.set()
    assert (await forced).access_token == "access-1"


async def test_an_orphaned_lock_does_not_hold_up_a_valid_token() -> None:
    parts = await build_parts(lock_wait_s=0.3)
    # A replica that died holding the lock (or whose release a failover lost).
    assert await parts.store.acquire_lock(parts.handle, "dead-replica", 60)
    valid = await load(parts.store, parts.handle)
    started = time.monotonic()
    for _ in range(10):
        assert await parts.refresher.ensure_fresh(parts.handle, valid) is valid
    assert time.monotonic() - started < 0.1
    assert parts.idp.calls == 0
    # An expired token waits for the lock, but no longer than lock_wait_s.
    expired = await parts.expiring_in(-1)
    started = time.monotonic()
    with pytest.raises(RefreshUnavailableError):
        await parts.refresher.ensure_fresh(parts.handle, expired)
    assert time.monotonic() - started < 0.3 + 0.2
    assert parts.counted("lock_timeout") == 1
    assert parts.idp.calls == 0
    await parts.refresher.aclose()
