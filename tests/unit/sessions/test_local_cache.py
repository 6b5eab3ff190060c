"""The local session cache's bookkeeping, without Redis: age, bounds, racing loads, and
what it does with the feed's news (told through its listener methods, by a stand-in feed)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.metrics import Metrics
from gateway.sessions.local_cache import LocalSessionCache
from gateway.sessions.model import Session
from tests.support.metrics import session_cache_reads


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StandInFeed:
    """A feed's state as the cache reads it: subscribed, and live (its heartbeat answers)."""

    def __init__(self) -> None:
        self.subscribed = True
        self.live = True


class Cached:
    """A cache on a stand-in feed, up, with its metrics."""

    def __init__(self, clock: Clock, **overrides: Any) -> None:
        options: dict[str, Any] = {"max_age_s": 2.0, "max_entries": 3, "absolute_timeout_s": 3600}
        options.update(overrides)
        self.feed = StandInFeed()
        self.metrics = Metrics()
        self.cache = LocalSessionCache(self.feed, self.metrics, clock=clock, **options)

    def down(self) -> None:
        """The feed went down, as ``InvalidationFeed`` does it: state first, then news."""
        self.feed.subscribed = self.feed.live = False
        self.cache.on_down()

    def up(self) -> None:
        self.feed.subscribed = self.feed.live = True
        self.cache.on_up()


def serving_cache(clock: Clock, **overrides: Any) -> LocalSessionCache:
    return Cached(clock, **overrides).cache


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
    cache.on_invalidate("other")  # ...an invalidation arrives (any session: we cannot know)...
    cache.put("id", session(), before)  # ...the load's answer may predate it
    assert cache.get("id") is None


def test_nothing_is_kept_or_served_while_the_feed_is_down() -> None:
    clock = Clock()
    cached = Cached(clock)
    cache = cached.cache
    cache.put("id", session(), cache.generation)
    cached.down()
    assert cache.get("id") is None
    cache.put("id", session(), cache.generation)
    cached.feed.subscribed = cached.feed.live = True  # not kept while down, even once up
    assert cache.get("id") is None


def test_the_feed_coming_back_empties_the_cache() -> None:
    """A subscription confirmed again (redis-py reconnected by itself): what was published
    in between is lost."""
    cached = Cached(Clock())
    cache = cached.cache
    cache.put("id", session(), cache.generation)
    before = cache.generation
    cached.up()
    assert cache.get("id") is None
    cache.put("id", session(), before)  # loaded before the gap: not kept
    assert cache.get("id") is None


def test_copies_are_not_served_while_the_feed_is_late() -> None:
    cached = Cached(Clock())
    cache = cached.cache
    cache.put("id", session(), cache.generation)
    cached.feed.live = False  # subscribed, but no heartbeat answered lately
    assert cache.get("id") is None
    cached.feed.live = True
    assert cache.get("id") is not None


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
    cache.on_invalidate("id")  # a write on some replica: the load under way may predate it
    late = asyncio.ensure_future(cache.coalesce("id", second))
    async with asyncio.timeout(5):  # a late caller that joined the old load never starts one
        await second.began.wait()
    first.release.set()
    second.release.set()
    assert (await early, await late) == (first.answer, second.answer)
    assert (first.started, second.started) == (1, 1)


async def test_no_sharing_while_the_feed_is_down() -> None:
    cached = Cached(Clock())
    cache = cached.cache
    cached.down()
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


async def test_a_load_under_way_is_not_shared_after_the_feed_went_down_or_came_back() -> None:
    for news in ("down and up", "up"):
        cached = Cached(Clock())
        first, second = GatedLoad(), GatedLoad()
        early = asyncio.ensure_future(cached.cache.coalesce("id", first))
        await first.began.wait()
        if news == "down and up":
            cached.down()
        cached.up()  # news sent meanwhile is lost: the load may predate some of it
        late = asyncio.ensure_future(cached.cache.coalesce("id", second))
        async with asyncio.timeout(5):
            await second.began.wait()
        first.release.set()
        second.release.set()
        assert (await early, await late) == (first.answer, second.answer)


async def test_every_read_is_counted_by_how_the_cache_answered() -> None:
    clock = Clock()
    cached = Cached(clock)
    cache = cached.cache
    load = GatedLoad()
    callers = [asyncio.ensure_future(cache.coalesce("id", load)) for _ in range(3)]
    await load.began.wait()
    load.release.set()
    await asyncio.gather(*callers)
    cache.put("id", session(), cache.generation)
    assert cache.get("id") is not None
    assert cache.get("other") is None  # not counted here: its coalesce counts the miss
    assert session_cache_reads(cached.metrics) == {"miss": 1, "shared": 2, "hit": 1}
    cached.down()
    assert cache.get("id") is None
    await cache.coalesce("id", load)
    assert session_cache_reads(cached.metrics) == {"miss": 1, "shared": 2, "hit": 1, "off": 1}


async def test_aclose_cancels_the_loads_under_way() -> None:
    cache = serving_cache(Clock())
    load = GatedLoad()
    caller = asyncio.ensure_future(cache.coalesce("id", load))
    await load.began.wait()
    await cache.aclose()
    assert cache.loads_under_way == 0
    (result,) = await asyncio.gather(caller, return_exceptions=True)
    assert isinstance(result, asyncio.CancelledError)
