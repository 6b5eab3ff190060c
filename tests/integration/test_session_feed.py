"""The invalidation feed on a real redis-server: what the store's Lua scripts publish reads
back, through ``feed.parse_message``, as what they did; a feed hears an operator's PUBLISH,
survives its subscription being killed, and gives up a half-open one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.metrics import Metrics
from gateway.sessions.feed import (
    FeedMessage,
    Heartbeat,
    InvalidationFeed,
    RedisSubscriber,
    channel_of,
    parse_message,
)
from gateway.sessions.local_cache import LocalSessionCache
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings
from tests.fakes.tcp_relay import TcpRelay
from tests.integration.test_session_cache import new_session
from tests.support.feed import WAIT_S, FeedNews, hearing, wait_subscribed
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration

PREFIX = "tgfeed"
CHANNEL = channel_of(PREFIX)
END = "end-of-test"  # published last, so that reading up to it needs no wait
BEAT = Heartbeat()


@contextlib.asynccontextmanager
async def subscribed_raw(url: str) -> AsyncIterator[tuple[Redis, PubSub]]:
    """A plain client and a confirmed subscription of its own to the channel."""
    raw = Redis.from_url(url)
    pubsub = raw.pubsub()
    try:
        await pubsub.subscribe(CHANNEL)
        async with asyncio.timeout(WAIT_S):
            while (await pubsub.get_message(timeout=WAIT_S) or {}).get("type") != "subscribe":
                pass
        yield raw, pubsub
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
        await raw.aclose()


async def heard(raw: Redis, pubsub: PubSub) -> list[FeedMessage]:
    """What was published since the last call, parsed by the feed's own parser."""
    await raw.publish(CHANNEL, END)
    messages: list[FeedMessage] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await pubsub.get_message(timeout=WAIT_S)
            if message is None or message["type"] != "message":
                continue
            parsed = parse_message(message["data"])
            if parsed == [FeedMessage("invalidate", END)]:
                return messages
            messages += parsed


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_each_publishing_script_publishes_what_the_feed_reads_as_its_write(
    redis_server: RedisServerProcess, wait_replicas: int
) -> None:
    """``_COMPARE_AND_SET`` (as EVALSHA, and as EVAL with ``wait_replicas``), ``_DELETE``
    and ``_RELEASE`` publish ``feed``'s messages, and only when they wrote."""
    settings = SessionSettings(
        redis_url=redis_server.url,
        key_prefix=PREFIX,
        local_cache_s=0,  # no feed of its own: what is published is all there is
        wait_replicas=wait_replicas,
    )
    store = RedisSessionStore(settings, build_redis(settings), Metrics())
    handle, session = new_session()
    storage_id = handle.storage_id
    async with subscribed_raw(redis_server.url) as (raw, pubsub):
        try:
            created = await store.create(handle, session)
            assert await heard(raw, pubsub) == []  # nobody could have a copy of it
            saved = await store.save(handle, dataclasses.replace(created, access_token="a-2"))
            assert saved is not None
            assert await heard(raw, pubsub) == [FeedMessage("invalidate", storage_id)]
            assert await store.save(handle, created) is None  # an old version: not written
            assert await heard(raw, pubsub) == []

            assert await store.acquire_lock(handle, "holder", 30)
            assert not await store.release_lock(handle, "someone else")
            assert await heard(raw, pubsub) == []
            assert await store.release_lock(handle, "holder")
            assert await heard(raw, pubsub) == [FeedMessage("unlock", storage_id)]

            assert await store.delete(handle)
            assert await heard(raw, pubsub) == [FeedMessage("invalidate", storage_id)]
            assert not await store.delete(handle)  # already ended: nothing to tell
            assert await heard(raw, pubsub) == []
        finally:
            await store.aclose()


@contextlib.asynccontextmanager
async def feed_on(
    url: str, heartbeat: Heartbeat = BEAT, metrics: Metrics | None = None
) -> AsyncIterator[tuple[InvalidationFeed, FeedNews]]:
    """A feed on its own client of ``url``, subscribed, heard from its start."""
    client = build_redis(SessionSettings(redis_url=url, redis_timeout_s=0.5))
    connect = RedisSubscriber(client, CHANNEL).subscribe
    feed = InvalidationFeed(connect, metrics or Metrics(), clock=time.time, heartbeat=heartbeat)
    with hearing(feed) as news:
        feed.start()
        try:
            await news.until(lambda: feed.subscribed)
            yield feed, news
        finally:
            await feed.aclose()
            await client.aclose()


async def test_a_feed_tells_what_an_operator_publishes(redis_server: RedisServerProcess) -> None:
    """The README's procedure for ending sessions behind tokengate's back publishes their
    storage ids, several in one message if need be."""
    async with feed_on(redis_server.url) as (feed, news):
        raw = Redis.from_url(redis_server.url)
        try:
            assert await raw.publish(CHANNEL, "id-1 id-2 unlock:id-3") == 1
        finally:
            await raw.aclose()
        await news.until(lambda: len(news.events) == 4)
        expected = [("invalidate", "id-1"), ("invalidate", "id-2"), ("unlock", "id-3")]
        assert news.events == [("up", ""), *expected]
        assert feed.live


async def test_a_killed_subscription_is_told_and_taken_up_again(
    redis_server: RedisServerProcess,
) -> None:
    async with feed_on(redis_server.url) as (feed, news):
        raw = Redis.from_url(redis_server.url)
        try:
            assert await raw.client_kill_filter(_type="pubsub") >= 1
        finally:
            await raw.aclose()
        # redis-py reconnects and subscribes again by itself, or the feed does: either way
        # its listeners hear that news may have been lost.
        await news.until(lambda: news.ups == 2)
        assert feed.subscribed


async def test_a_heartbeat_answered_by_redis_keeps_the_feed_live(
    redis_server: RedisServerProcess,
) -> None:
    quick = Heartbeat(every_s=0.02, fresh_s=0.05, silent_s=0.1)
    async with feed_on(redis_server.url, quick) as (feed, news):
        # Five times the silence limit: a PING left unanswered would have ended it.
        gone = asyncio.ensure_future(news.until(lambda: news.downs > 0, timeout_s=0.5))
        with pytest.raises(TimeoutError):
            await gone
        assert feed.subscribed
        assert feed.live


async def test_a_feed_fallen_silent_is_given_up_and_the_copies_with_it(
    redis_server: RedisServerProcess,
) -> None:
    """A half-open subscription (a NAT forgot the flow) raises no error and brings no
    message: the heartbeat notices, the cache listening empties, a new subscription takes
    over."""
    relay = await TcpRelay("127.0.0.1", redis_server.port).start()
    metrics = Metrics()
    quick = Heartbeat(every_s=0.05, fresh_s=0.1, silent_s=0.3)
    settings = SessionSettings(redis_url=redis_server.url, key_prefix=PREFIX, local_cache_s=0)
    writer = RedisSessionStore(settings, build_redis(settings), Metrics())
    try:
        url = f"redis://127.0.0.1:{relay.port}/0"
        async with feed_on(url, quick, metrics) as (feed, news):
            cache = LocalSessionCache(
                feed,
                metrics,
                max_age_s=30,
                max_entries=10,
                absolute_timeout_s=3600,
                clock=time.time,
            )
            feed.add_listener(cache)
            handle, session = new_session()
            created = await writer.create(handle, session)
            cache.put(handle.storage_id, created, cache.generation)
            assert cache.get(handle.storage_id) is not None
            assert relay.silence() == 1  # the subscription
            assert await writer.delete(handle)  # published; the feed hears nothing
            await wait_subscribed(feed, False)
            assert cache.get(handle.storage_id) is None
            assert metrics.registry.get_sample_value("tokengate_session_store_errors_total") == 1
            await wait_subscribed(feed)  # subscribed anew, through the relay
            assert news.told("invalidate") == []  # the end was lost: the new start says so
            assert news.events[-2:] == [("down", ""), ("up", "")]
    finally:
        await writer.aclose()
        await relay.aclose()
