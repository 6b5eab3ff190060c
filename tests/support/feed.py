"""What an invalidation feed tells, for tests: recorded, and awaited instead of polled.

with hearing(feed) as news:
    ...                                   # a write, a release, a broken connection
    await news.invalidation(storage_id)   # or news.until(lambda: news.ups == 2)
await wait_subscribed(feed)               # or wait_subscribed(feed, False)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from gateway.sessions.feed import FeedListener, InvalidationFeed
from gateway.sessions.redis_store import RedisSessionStore

WAIT_S = 5.0


class FeedNews(FeedListener):
    """Every event a feed told, in order, as ``(kind, storage id or "")``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._told = asyncio.Event()

    def _tell(self, kind: str, storage_id: str = "") -> None:
        self.events.append((kind, storage_id))
        self._told.set()

    def on_invalidate(self, storage_id: str) -> None:
        self._tell("invalidate", storage_id)

    def on_unlock(self, storage_id: str) -> None:
        self._tell("unlock", storage_id)

    def on_up(self) -> None:
        self._tell("up")

    def on_down(self) -> None:
        self._tell("down")

    def told(self, kind: str) -> list[str]:
        return [storage_id for told, storage_id in self.events if told == kind]

    @property
    def ups(self) -> int:
        return len(self.told("up"))

    @property
    def downs(self) -> int:
        return len(self.told("down"))

    async def until(self, done: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        """Return once ``done()`` holds, looking again after each event."""
        async with asyncio.timeout(timeout_s):
            while not done():
                self._told.clear()
                await self._told.wait()

    async def invalidation(self, *storage_ids: str, timeout_s: float = WAIT_S) -> None:
        """Return once every one of ``storage_ids`` was told invalidated."""
        await self.until(lambda: set(storage_ids) <= set(self.told("invalidate")), timeout_s)


@contextlib.contextmanager
def hearing(feed: InvalidationFeed) -> Iterator[FeedNews]:
    news = FeedNews()
    feed.add_listener(news)
    try:
        yield news
    finally:
        feed.remove_listener(news)


async def wait_subscribed(
    feed: InvalidationFeed, subscribed: bool = True, timeout_s: float = WAIT_S
) -> None:
    with hearing(feed) as news:
        await news.until(lambda: feed.subscribed == subscribed, timeout_s)


def feed_of(store: RedisSessionStore) -> InvalidationFeed:
    assert store.feed is not None
    return store.feed
