"""The local session cache: two replicas on one real redis-server.

A replica serves a session it loaded recently without asking Redis, and drops its copy the
moment another replica writes or ends the session (Redis pub/sub), or when the feed of
those invalidations breaks. The feed itself, alone, is ``test_session_feed.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from gateway.metrics import Metrics
from gateway.sessions import redis_store
from gateway.sessions.crypto import derive_handle
from gateway.sessions.local_cache import LocalSessionCache
from gateway.sessions.model import Session, SessionHandle
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings
from tests.support.feed import feed_of, hearing, wait_subscribed
from tests.support.metrics import session_cache_reads
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration

PREFIX = "tgc"
WAIT_S = 5.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServerProcess]:
    with RedisServerProcess() as server:
        yield server


def settings(url: str) -> SessionSettings:
    return SessionSettings(redis_url=url, key_prefix=PREFIX, local_cache_s=30)


@contextlib.asynccontextmanager
async def replica(url: str, metrics: Metrics | None = None) -> AsyncIterator[RedisSessionStore]:
    """A store on ``url``, its feed subscribed; closed on exit."""
    store = RedisSessionStore(settings(url), build_redis(settings(url)), metrics or Metrics())
    try:
        store.start()
        await wait_subscribed(feed_of(store), timeout_s=WAIT_S)
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def replicas(
    redis_server: RedisServerProcess,
) -> AsyncIterator[tuple[RedisSessionStore, RedisSessionStore, Redis]]:
    if not redis_server.running:
        redis_server.restart()
    raw = Redis.from_url(redis_server.url)
    await raw.flushall()
    async with replica(redis_server.url) as a, replica(redis_server.url) as b:
        yield a, b, raw
    await raw.aclose()


def new_session() -> tuple[SessionHandle, Session]:
    handle = derive_handle(secrets.token_bytes(32))
    session = Session(
        subject="alice",
        access_token="access-1",
        access_expires_at=time.time() + 300,
        refresh_token="refresh-1",
        scopes=("api.read",),
        claims={"sub": "alice"},
    )
    return handle, session


async def cached_on(
    creator: RedisSessionStore, *readers: RedisSessionStore
) -> tuple[SessionHandle, Session]:
    """A new session, created on ``creator`` and in the local cache of each reader."""
    handle, session = new_session()
    created = await creator.create(handle, session)
    for reader in readers:
        assert await reader.load(handle, cached=True) is not None
    return handle, created


def cache_of(store: RedisSessionStore) -> LocalSessionCache:
    assert store.cache is not None
    return store.cache


async def test_a_cached_load_needs_no_redis_and_a_fresh_one_does(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    a, b, raw = replicas
    handle, session = new_session()
    await a.create(handle, session)
    loaded = await b.load(handle, cached=True)
    assert loaded is not None
    # Gone from Redis behind the stores' backs (no publish): B's copy still answers...
    await raw.delete(f"{PREFIX}:{{{handle.storage_id}}}:s")
    assert await b.load(handle, cached=True) == loaded
    # ...but never to a caller that asked for Redis's own answer (the refresh protocol).
    assert await b.load(handle) is None


async def test_a_hand_deleted_session_published_by_the_operator_is_dropped_everywhere(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    """The README's procedure for ending a session behind tokengate's back: DEL the key,
    then PUBLISH its storage id on ``<key_prefix>:invalidate``."""
    a, b, raw = replicas
    handle, _ = await cached_on(a, a, b)
    with hearing(feed_of(a)) as on_a, hearing(feed_of(b)) as on_b:
        await raw.delete(f"{PREFIX}:{{{handle.storage_id}}}:s")
        assert await raw.publish(f"{PREFIX}:invalidate", handle.storage_id) == 2
        for store, news in ((a, on_a), (b, on_b)):
            await news.invalidation(handle.storage_id)
            assert await store.load(handle, cached=True) is None


async def test_an_end_on_one_replica_drops_the_copy_on_the_other(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    a, b, _ = replicas
    handle, _ = await cached_on(a, b)
    with hearing(feed_of(b)) as news:
        assert await a.delete(handle)
        await news.invalidation(handle.storage_id)
    assert await b.load(handle, cached=True) is None


async def test_a_write_on_one_replica_reaches_the_other_and_its_own_copy_at_once(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    a, b, _ = replicas
    handle, created = await cached_on(a, a, b)
    with hearing(feed_of(b)) as news:
        saved = await a.save(handle, dataclasses.replace(created, access_token="access-2"))
        assert saved is not None
        mine = await a.load(handle, cached=True)  # the writer's own copy is dropped at once
        assert mine is not None
        assert mine.access_token == "access-2"
        await news.invalidation(handle.storage_id)
    theirs = await b.load(handle, cached=True)
    assert theirs is not None
    assert (theirs.access_token, theirs.version) == ("access-2", saved.version)


async def test_back_channel_logout_by_subject_reaches_every_replica(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    a, b, _ = replicas
    handles = []
    for _ in range(3):
        handles.append((await cached_on(a, b))[0])
    with hearing(feed_of(b)) as news:
        assert await a.delete_by_subject("alice") == 3
        await news.invalidation(*(handle.storage_id for handle in handles))
    for handle in handles:
        assert await b.load(handle, cached=True) is None


async def test_a_broken_invalidation_feed_drops_every_copy(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    _, b, raw = replicas
    handle, _ = await cached_on(b, b)
    await raw.delete(f"{PREFIX}:{{{handle.storage_id}}}:s")  # unpublished, unseen
    with hearing(feed_of(b)) as news:
        await raw.client_kill_filter(_type="pubsub")  # the feed breaks; Redis stays up
        # redis-py reconnects and subscribes again; invalidations in between may be lost,
        # so the new subscription empties the cache.
        await news.until(lambda: news.ups == 1)
    assert await b.load(handle, cached=True) is None


async def test_redis_gone_turns_the_cache_off(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
    redis_server: RedisServerProcess,
) -> None:
    _, b, _ = replicas
    handle, _ = await cached_on(b, b)
    redis_server.kill()
    await wait_subscribed(feed_of(b), False, timeout_s=WAIT_S)
    assert cache_of(b).get(handle.storage_id) is None
    redis_server.restart()


async def evalsha_calls(raw: Redis) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_burst_on_an_uncached_session_makes_one_redis_read(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
    redis_server: RedisServerProcess,
) -> None:
    a, _, raw = replicas
    metrics = Metrics()
    async with replica(redis_server.url, metrics) as b:
        handle, session = new_session()
        await a.create(handle, session)
        await b.load(new_session()[0])  # the server knows the script: no NOSCRIPT retry below
        before = await evalsha_calls(raw)
        loaded = await asyncio.gather(*(b.load(handle, cached=True) for _ in range(100)))
        assert {s.access_token if s else None for s in loaded} == {"access-1"}
        assert await evalsha_calls(raw) - before == 1
        assert await b.load(handle, cached=True) is not None  # kept: no Redis
        assert session_cache_reads(metrics) == {"miss": 1, "shared": 99, "hit": 1}
        # Uncached reads (refresh, logout) never share: each asks Redis.
        await asyncio.gather(*(b.load(handle) for _ in range(3)))
        assert await evalsha_calls(raw) - before == 4
        assert session_cache_reads(metrics) == {"miss": 1, "shared": 99, "hit": 1}


async def command_calls(raw: Redis, command: str) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_lock_released_on_one_replica_wakes_the_waiter_on_another(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release is published: the waiter looks at the lock twice (before and after the
    wake-up), not every few milliseconds, and the release drops no cached copy."""
    # No fallback poll within this test: only the published release can wake the waiter.
    monkeypatch.setattr(redis_store, "_POLL_WITH_FEED_S", 60.0)
    a, b, raw = replicas
    handle, session = new_session()
    await a.create(handle, session)
    assert await b.load(handle, cached=True) is not None
    assert b.cache is not None
    assert await a.acquire_lock(handle, "holder", 30)
    before = await command_calls(raw, "exists")
    waiter = asyncio.create_task(b.wait_for_unlock(handle, 30))
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    assert not done  # still locked: still waiting
    assert b.wakeups.locks_awaited == 1  # parked on the feed
    assert await a.release_lock(handle, "holder")
    async with asyncio.timeout(WAIT_S):
        await waiter
    assert await command_calls(raw, "exists") - before == 2
    assert b.cache.get(handle.storage_id) is not None  # an unlock is no invalidation
    assert b.wakeups.locks_awaited == 0


async def test_a_lock_whose_holder_died_is_noticed_by_the_fallback_poll(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
) -> None:
    """A lock that runs out its TTL publishes nothing; the waiter still looks now and then."""
    a, b, _ = replicas
    handle = new_session()[0]
    assert await a.acquire_lock(handle, "crashed", 0.1)  # never released
    async with asyncio.timeout(WAIT_S):
        await b.wait_for_unlock(handle, 30)
    assert await b.acquire_lock(handle, "next", 30)


async def test_a_release_lost_while_the_feed_reconnects_still_wakes_the_waiter(
    replicas: tuple[RedisSessionStore, RedisSessionStore, Redis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages published while a subscription is down are lost; a new subscription wakes
    every waiter to look at its lock again."""
    monkeypatch.setattr(redis_store, "_POLL_WITH_FEED_S", 60.0)
    a, b, raw = replicas
    handle = new_session()[0]
    assert await a.acquire_lock(handle, "holder", 30)
    waiter = asyncio.create_task(b.wait_for_unlock(handle, 30))
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    assert not done
    await raw.delete(f"{PREFIX}:{{{handle.storage_id}}}:lock")  # released, unpublished
    await raw.client_kill_filter(_type="pubsub")  # the feed breaks; redis-py resubscribes
    async with asyncio.timeout(WAIT_S):
        await waiter
