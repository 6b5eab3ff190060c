"""A session's refresh backoff in the store: memory and fakeredis (a real redis-server in
tests/integration/test_refresh_resilience.py). Shared by replicas, kept for its TTL, gone
with the session."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import fakeredis
import pytest

from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import RefreshBackoff, Session, SessionStore
from gateway.sessions.redis_store import RedisSessionStore
from gateway.settings import SessionSettings
from tests.unit.sessions.test_refresh import Clock

HANDLE = derive_handle(b"b" * 32)


@pytest.fixture(params=["memory", "fakeredis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[SessionStore, Clock]]:
    clock = Clock(time.time())
    built: SessionStore
    if request.param == "memory":
        built = MemorySessionStore(SessionSettings(store="memory"), clock=clock)
    else:
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        built = RedisSessionStore(SessionSettings(), client, Metrics(), clock)
    await built.create(
        HANDLE,
        Session(subject="alice", access_token="a", access_expires_at=clock() + 60),
    )
    yield built, clock
    await built.aclose()


async def test_a_saved_backoff_loads_back_until_cleared(store: tuple[SessionStore, Clock]) -> None:
    sessions, clock = store
    assert await sessions.load_backoff(HANDLE) is None
    backoff = RefreshBackoff(attempts=3, until=round(clock() + 4.0, 3))
    await sessions.save_backoff(HANDLE, backoff, ttl_s=34.0)
    assert await sessions.load_backoff(HANDLE) == backoff
    await sessions.clear_backoff(HANDLE)
    assert await sessions.load_backoff(HANDLE) is None


async def test_a_backoff_ends_with_its_session(store: tuple[SessionStore, Clock]) -> None:
    sessions, clock = store
    await sessions.save_backoff(HANDLE, RefreshBackoff(1, clock() + 1.0), ttl_s=31.0)
    assert await sessions.delete(HANDLE)
    assert await sessions.load_backoff(HANDLE) is None


async def test_the_memory_store_forgets_a_backoff_after_its_ttl() -> None:
    clock = Clock(1_000_000.0)
    sessions = MemorySessionStore(SessionSettings(store="memory"), clock=clock)
    await sessions.save_backoff(HANDLE, RefreshBackoff(2, clock() + 2.0), ttl_s=32.0)
    clock.now += 31.9
    assert await sessions.load_backoff(HANDLE) == RefreshBackoff(2, 1_000_002.0)
    clock.now += 0.1
    assert await sessions.load_backoff(HANDLE) is None


async def test_the_redis_store_keeps_a_backoff_for_its_ttl() -> None:
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeAsyncRedis(server=server)
    sessions = RedisSessionStore(
        SessionSettings(key_prefix="p"), fakeredis.FakeAsyncRedis(server=server), Metrics()
    )
    await sessions.save_backoff(HANDLE, RefreshBackoff(2, 1_000_002.5), ttl_s=32.0)
    key = f"p:{{{HANDLE.storage_id}}}:backoff"
    assert await raw.get(key) == b"2:1000002500"
    assert 31_000 < await raw.pttl(key) <= 32_000
    await raw.set(key, b"not a backoff")
    assert await sessions.load_backoff(HANDLE) is None
    await sessions.aclose()
    await raw.aclose()
