"""This process's copies of recently loaded sessions, dropped the moment any replica changes them.

A session request costs a Redis round trip and a decryption; most of them read a session
nobody changed since the last request. ``LocalSessionCache`` keeps the decrypted session
for ``session.local_cache_s`` (never past its absolute timeout), and every write or end of
a session, on any replica, drops the copies everywhere through the invalidation feed
(``feed``): a logout or a refresh on one replica reaches the others within one pub/sub
delivery (well under a millisecond on one network).

The cache keeps copies only while the feed is subscribed, and serves them only while it is
live (a heartbeat answered recently); it empties when the feed goes down and again when it
comes back, because invalidations sent meanwhile are lost. A load that raced an
invalidation is not kept.

Concurrent misses for one session share one load (``coalesce``): a burst of requests on a
session not in the cache (a page load, a refresh storm) makes one Redis round trip, not
one each. A load under way is shared only until an invalidation of its session arrives;
requests after that start a new one, so sharing never shows what a copy could not.

The subscription, its liveness and the messages are ``feed``'s; what a session is and how
it is stored is ``redis_store``'s; this module only keeps copies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.metrics import Metrics
from gateway.sessions.feed import FeedListener, FeedState
from gateway.sessions.model import Session
from gateway.single_flight import SingleFlight


class LocalSessionCache(FeedListener):
    """Owns its copies and its shared loads (``aclose`` cancels those under way); listens
    to a feed it does not own (whoever builds it adds it as a listener)."""

    def __init__(
        self,
        feed: FeedState,
        metrics: Metrics,
        *,
        max_age_s: float,
        max_entries: int,
        absolute_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._feed = feed
        self._metrics = metrics
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._absolute_timeout_s = absolute_timeout_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._loading: SingleFlight[str, Session | None] = SingleFlight("session-load")
        self._generation = 0  # counts invalidations (and resets): a racing load is not kept

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, storage_id: str) -> Session | None:
        """The kept copy, counted as a ``hit``; a miss is counted by ``coalesce``."""
        entry = self._entries.get(storage_id)  # none while not subscribed: emptied, not kept
        if entry is None:
            return None
        session, until = entry
        if until <= self._clock():
            del self._entries[storage_id]
            return None
        if not self._feed.live:
            return None  # the feed is late: an invalidation may be on its way
        self._metrics.add(self._metrics.session_cache_total, "hit")  # every cached read
        return session

    def _count(self, result: str) -> None:
        metrics = self._metrics
        metrics.add(metrics.session_cache_total, result)

    def put(self, storage_id: str, session: Session, generation: int) -> None:
        """Keep ``session``, loaded from Redis when the generation was ``generation``."""
        if not self._feed.subscribed or generation != self._generation:
            return  # an invalidation may have passed the load: this copy may be stale
        now = self._clock()
        until = min(now + self._max_age_s, session.created_at + self._absolute_timeout_s)
        if until <= now:
            return
        entries = self._entries
        entries[storage_id] = (session, until)
        entries.move_to_end(storage_id)
        if len(entries) > self._max_entries:
            entries.popitem(last=False)

    async def coalesce(
        self, storage_id: str, load: Callable[[], Coroutine[Any, Any, Session | None]]
    ) -> Session | None:
        """``load()``, shared with every caller for ``storage_id`` while one is under way.
        Counted as ``miss`` (this caller loads), ``shared`` (it joins a load under way) or
        ``off`` (the feed is not live: every caller loads)."""
        if not self._feed.live:
            self._count("off")
            return await load()
        self._count("miss" if self._loading.running(storage_id) is None else "shared")
        # One caller going away (client gone) never cancels the others' load.
        return await self._loading.join(storage_id, load)

    @property
    def loads_under_way(self) -> int:
        """Sessions being loaded from Redis now, each once for all its callers."""
        return len(self._loading)

    def on_invalidate(self, storage_id: str) -> None:
        self._generation += 1
        self._entries.pop(storage_id, None)
        self._loading.forget(storage_id)  # later callers must not join an older read

    def on_up(self) -> None:
        self._reset()  # what was published while we were not listening is lost

    def on_down(self) -> None:
        self._reset()  # nothing will tell us of a change any more

    def _reset(self) -> None:
        self._entries.clear()
        self._loading.forget_all()
        self._generation += 1

    async def aclose(self) -> None:
        self._reset()
        await self._loading.aclose()
