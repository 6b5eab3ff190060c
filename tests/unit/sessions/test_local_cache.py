"""The local session cache's bookkeeping, without Redis: age, bounds, and racing loads."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from gateway.metrics import Metrics
from gateway.sessions import local_cache
from gateway.sessions.local_cache import FeedSilentError, LocalSessionCache
from gateway.sessions.model import Session
from tests.support.metrics import session_cache_reads


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serving_cache(clock: Clock, **overrides: Any) -> LocalSessionCache:
    options: dict[str, Any] = {"max_age_s": 2.0, "max_entries": 3, "absolute_timeout_s": 3600}
    options.update(overrides)
    cache = LocalSessionCache(None, "ch", Metrics(), clock=clock, **options)  # type: ignore[arg-type]
    cache._serving = True  # as after a confirmed subscription...
    cache._heard_until = math.inf  # ...whose heartbeat always answers
    return cache


def session(created_at: float = 1000.0) -> Session:
    return Session(subject="s", access_token="a", access_expires_at=2000.0, created_at=created_at)


def test_a_copy_is_served_for_max_age_only() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    cache.put("id", session(), cache.generation)
    clock.now += 1.9
    assert cache.get("id") is not None
    clock.now += 0.2
    assert cache.get("id") is None


def test_a_copy_never_outlives_the_absolute_timeout() -> None:
    clock = Clock()
    cache = serving_cache(clock, absolute_timeout_s=100)
    cache.put("id", session(created_at=clock.now - 99.5), cache.generation)
    clock.now += 0.6
    assert cache.get("id") is None


def test_a_load_that_raced_an_invalidation_is_not_kept() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    before = cache.generation  # the load is sent...
    cache.drop("other")  # ...an invalidation arrives (any session: we cannot know)...
    cache.put("id", session(), before)  # ...the load's answer may predate it
    assert cache.get("id") is None


def test_nothing_is_kept_or_served_while_not_serving() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    cache.put("id", session(), cache.generation)
    cache._stop_serving()
    assert cache.get("id") is None
    cache.put("id", session(), cache.generation)
    cache._serving = True
    cache._heard_until = math.inf
    assert cache.get("id") is None


def test_the_oldest_copy_goes_first_past_the_bound() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    for name in ("a", "b", "c", "d"):
        cache.put(name, session(), cache.generation)
    assert [cache.get(n) is not None for n in ("a", "b", "c", "d")] == [False, True, True, True]


class GatedLoad:
    """A load that answers when released, counting how often it was started."""

    def __init__(self, answer: Session | None = None, error: Exception | None = None) -> None:
        self.started = 0
        self.began = asyncio.Event()  # set once started: every caller scheduled before ran
        self.release = asyncio.Event()
        self.answer = answer or session()
        self.error = error

    async def __call__(self) -> Session | None:
        self.started += 1
        self.began.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.answer


async def test_concurrent_misses_share_one_load() -> None:
    cache = serving_cache(Clock())
    load = GatedLoad()
    callers = [asyncio.ensure_future(cache.coalesce("id", load)) for _ in range(50)]
    await load.began.wait()
    load.release.set()
    assert await asyncio.gather(*callers) == [load.answer] * 50
    assert load.started == 1
    assert cache.loads_under_way == 0  # landed: the next miss loads again


async def test_after_an_invalidation_new_callers_start_a_new_load() -> None:
    cache = serving_cache(Clock())
    first, second = GatedLoad(), GatedLoad(session(created_at=999.0))
    early = asyncio.ensure_future(cache.coalesce("id", first))
    await first.began.wait()
    cache.drop("id")  # a write on some replica: the load under way may predate it
    late = asyncio.ensure_future(cache.coalesce("id", second))
    async with asyncio.timeout(5):  # a late caller that joined the old load never starts one
        await second.began.wait()
    first.release.set()
    second.release.set()
    assert (await early, await late) == (first.answer, second.answer)
    assert (first.started, second.started) == (1, 1)


async def test_no_sharing_while_not_serving() -> None:
    cache = serving_cache(Clock())
    cache._stop_serving()
    load = GatedLoad()
    load.release.set()
    await asyncio.gather(*(cache.coalesce("id", load) for _ in range(3)))
    assert load.started == 3


async def test_a_caller_going_away_does_not_cancel_the_shared_load() -> None:
    cache = serving_cache(Clock())
    load = GatedLoad()
    leaving = asyncio.ensure_future(cache.coalesce("id", load))
    staying = asyncio.ensure_future(cache.coalesce("id", load))
    await load.began.wait()
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    load.release.set()
    assert await staying is load.answer
    assert leaving.cancelled()


async def test_a_failed_load_fails_every_caller_and_is_not_kept() -> None:
    cache = serving_cache(Clock())
    load = GatedLoad(error=ConnectionError("redis went away"))
    callers = [asyncio.ensure_future(cache.coalesce("id", load)) for _ in range(3)]
    await load.began.wait()
    load.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    assert load.started == 1
    assert cache.loads_under_way == 0


async def test_every_read_is_counted_by_how_the_cache_answered() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    load = GatedLoad()
    callers = [asyncio.ensure_future(cache.coalesce("id", load)) for _ in range(3)]
    await load.began.wait()
    load.release.set()
    await asyncio.gather(*callers)
    cache.put("id", session(), cache.generation)
    assert cache.get("id") is not None
    assert cache.get("other") is None  # not counted here: its coalesce counts the miss
    assert session_cache_reads(cache._metrics) == {"miss": 1, "shared": 2, "hit": 1}
    cache._stop_serving()
    assert cache.get("id") is None
    await cache.coalesce("id", load)
    assert session_cache_reads(cache._metrics) == {"miss": 1, "shared": 2, "hit": 1, "off": 1}


async def test_a_lock_waiter_wakes_for_its_session_or_the_feed_going_down() -> None:
    cache = serving_cache(Clock())
    with cache.lock_released("id") as released:
        cache.drop("other")
        assert not released.done()
        cache.drop("id")  # its session changed: look at the lock again
        assert released.done()
    with cache.lock_released("id") as released:
        cache._stop_serving()  # no release can reach it any more: it must poll
        assert released.done()
    assert cache._lock_waiters == {}


async def test_a_session_watcher_wakes_for_its_session_or_the_feed_going_down() -> None:
    cache = serving_cache(Clock())
    with cache.session_changed("id") as changed:
        cache.drop("other")
        assert not changed.done()
        cache.drop("id")  # written or ended, on some replica: the watcher looks
        assert changed.done()
    with cache.session_changed("id") as changed:
        cache._stop_serving()  # no end can reach it any more: it must poll
        assert changed.done()
    assert cache.watched == 0


class FeedEnded(Exception):
    """The scripted feed has nothing more to say."""


Step = Callable[["ScriptedFeed"], dict[str, Any] | None]


class ScriptedFeed:
    """A subscription whose every read is the next step of a script; a step may move the
    clock. Records the PINGs sent on it."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = deque(steps)
        self.pings: list[str] = []

    async def ping(self, payload: str) -> None:
        self.pings.append(payload)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109  # redis-py's signature
        await asyncio.sleep(0)
        if not self.steps:
            raise FeedEnded
        return self.steps.popleft()(self)


def subscribed(feed: ScriptedFeed) -> dict[str, Any]:
    return {"type": "subscribe", "channel": b"ch", "data": 1}


def answer(index: int) -> Step:
    return lambda feed: {"type": "pong", "channel": None, "data": feed.pings[index].encode()}


def wait(clock: Clock, seconds: float) -> Step:
    def step(feed: ScriptedFeed) -> None:
        clock.now += seconds

    return step


async def follow(cache: LocalSessionCache, feed: ScriptedFeed) -> None:
    with pytest.raises(FeedEnded):
        await cache._follow(feed)  # type: ignore[arg-type]


async def test_copies_are_served_only_while_a_recent_heartbeat_came_back() -> None:
    clock = Clock()
    cache = serving_cache(clock, max_age_s=60.0)
    cache._stop_serving()
    feed = ScriptedFeed([subscribed, answer(0)])
    await follow(cache, feed)
    assert feed.pings == ["hb:1"]  # sent at once on a confirmed subscription
    cache.put("id", session(), cache.generation)
    clock.now += local_cache._FRESH_S - 0.01
    assert cache.get("id") is not None
    clock.now += 0.02  # no newer answer: an invalidation may be stuck on the way
    assert cache.get("id") is None
    load = GatedLoad()
    load.release.set()
    await cache.coalesce("id", load)
    assert session_cache_reads(cache._metrics)["off"] == 1


async def test_an_answer_counts_from_when_its_ping_was_sent() -> None:
    clock = Clock()
    cache = serving_cache(clock, max_age_s=60.0)
    cache._stop_serving()
    beat = local_cache._HEARTBEAT_S
    # Two PINGs go out; the answer to the second arrives late, and answers the first too.
    feed = ScriptedFeed([subscribed, wait(clock, beat), wait(clock, beat), answer(1)])
    await follow(cache, feed)
    assert feed.pings == ["hb:1", "hb:2", "hb:3"]
    sent_second = 1000.0 + beat
    assert cache._heard_until == sent_second + local_cache._FRESH_S


async def test_a_feed_that_stops_answering_is_given_up() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    cache._stop_serving()
    beat = local_cache._HEARTBEAT_S
    steps: list[Step] = [subscribed, answer(0)]
    steps += [wait(clock, beat)] * int(local_cache._SILENT_S / beat + 2)
    feed = ScriptedFeed(steps)
    with pytest.raises(FeedSilentError):
        await cache._follow(feed)  # type: ignore[arg-type]
    assert len(feed.steps) <= 1  # it gave up soon after the silence passed the limit
    assert len(feed.pings) >= local_cache._SILENT_S / beat


async def test_a_new_subscription_forgets_pings_sent_before_it() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    cache._stop_serving()
    beat = local_cache._HEARTBEAT_S
    silent = int(local_cache._SILENT_S / beat)
    # redis-py reconnected on its own: PINGs on the old connection will never be answered.
    steps: list[Step] = [subscribed, *[wait(clock, beat)] * (silent - 1), subscribed]
    steps += [wait(clock, beat), wait(clock, beat), answer(-1)]  # past the first PING's limit
    feed = ScriptedFeed(steps)
    await follow(cache, feed)
    assert cache.serving
    assert cache._heard_until > clock.now


class SwallowingFeed(ScriptedFeed):
    """A PING that finishes as the cancellation comes and returns instead of raising it,
    as redis-py's send through ``asyncio.wait_for`` does on Python 3.11
    (python/cpython#86296); then reads that bring nothing, forever."""

    def __init__(self) -> None:
        super().__init__([subscribed])
        self.sending = asyncio.Event()

    async def ping(self, payload: str) -> None:
        self.pings.append(payload)
        self.sending.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109  # redis-py's signature
        if self.steps:
            return await super().get_message(timeout)
        await asyncio.sleep(0)
        return None


async def test_a_cancellation_swallowed_by_redis_py_still_stops_the_listener() -> None:
    cache = serving_cache(Clock())
    cache._stop_serving()
    feed = SwallowingFeed()
    listener = asyncio.create_task(cache._follow(feed))  # type: ignore[arg-type]
    await feed.sending.wait()
    listener.cancel()  # as aclose does, while the PING is being sent
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1.0):  # it kept reading, cancelled, until shutdown hung
            await listener


def published(text: str) -> Step:
    return lambda feed: {"type": "message", "channel": b"ch", "data": text.encode()}


async def test_a_session_watcher_wakes_for_a_published_write_or_end_never_for_an_unlock() -> None:
    cache = serving_cache(Clock())
    with cache.session_changed("id") as changed:
        await follow(cache, ScriptedFeed([published("unlock:id other")]))
        assert not changed.done()  # a released refresh lock says nothing of the session
        await follow(cache, ScriptedFeed([published("other id")]))
        assert changed.done()
    with cache.session_changed("id") as changed:
        # Subscribed again (redis-py reconnected): an end published meanwhile is lost.
        await follow(cache, ScriptedFeed([subscribed]))
        assert changed.done()
    assert cache.watched == 0
