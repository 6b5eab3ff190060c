"""This process's copies of recently loaded sessions, dropped the moment any replica changes them.

A session request costs a Redis round trip and a decryption; most of them read a session
nobody changed since the last request. ``LocalSessionCache`` keeps the decrypted session
for ``session.local_cache_s`` (never past its absolute timeout), and every write or end of
a session, on any replica, is published on ``<prefix>:invalidate`` (Redis pub/sub) and
drops the copies everywhere: a logout or a refresh on one replica reaches the others within
one pub/sub delivery (well under a millisecond on one network).

The cache serves only while its subscription is confirmed: from a disconnect until the
subscription is back it is empty and off (every load goes to Redis), because invalidations
sent meanwhile are lost. A load that raced an invalidation is not kept.

A connection can also die without a word (a NAT or load balancer forgetting an idle flow,
a failover behind a proxy): the subscriber only reads, so it would wait forever while the
invalidations go elsewhere, and redis-py's own health check sends a PING but never looks
for the answer. So the listener sends a PING of its own on the subscription every
``_HEARTBEAT_S`` and a copy is served only while a PING sent at most ``_FRESH_S`` ago has
come back: Redis answers in order, so by then every invalidation published before that
PING has been applied. Past ``_SILENT_S`` without an answer the connection is given up
(cache emptied and off) and a new one subscribes.

Concurrent misses for one session share one load (``coalesce``): a burst of requests on a
session not in the cache (a page load, a refresh storm) makes one Redis round trip, not
one each. A load under way is shared only until an invalidation of its session arrives;
requests after that start a new one, so sharing never shows what a copy could not.

On a Redis Cluster the subscription is a connection of its own to one node (redis-py's
cluster client has no asyncio pub/sub): a PUBLISH, from a script too, is sent to every node
over the cluster bus, so any node hears every invalidation. The node is the cluster client's
first primary (an arbitrary choice: any would do), then the next node in its list each time
a subscription ends (a node that failed over or died), with the client's credentials, TLS
and timeouts.

The same channel carries ``unlock:<storage id>`` when a refresh lock is released: it drops
nothing, and wakes this process's request waiting for that lock (``lock_released``). Every
invalidation of a session also wakes whoever watches it (``session_changed``: a WebSocket
that must end with its session), and so does the feed going down or coming back.
What a session is and how it is stored is ``redis_store``'s business; this module only
keeps copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.metrics import Metrics
from gateway.sessions.model import Session, Waiters
from gateway.single_flight import SingleFlight

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 1.0  # get_message waits this long, then loops (and notices aclose)
_HEARTBEAT_S = 1.0  # a PING on the subscription this often
_FRESH_S = 2.0  # copies are served while a PING sent at most this long ago was answered
_SILENT_S = 5.0  # a PING unanswered this long: the connection is dead, subscribe anew
_HEARTBEAT = "hb:"  # our PINGs' payload prefix (redis-py's own health check is filtered)
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0
# On the invalidation channel, next to storage ids: "unlock:<storage id>", a refresh lock
# released (no copy is dropped for it). A replica that predates it drops nothing real.
_UNLOCK = "unlock:"


def unlock_message(storage_id: str) -> str:
    return _UNLOCK + storage_id


class FeedSilentError(ConnectionError):
    """The subscription stopped answering its heartbeat: half-open, or Redis stuck."""


def _raise_if_cancelled() -> None:
    """Raise a cancellation of this task that a library swallowed. redis-py sends with
    ``asyncio.wait_for`` when ``socket_timeout`` is set, and on Python 3.11 ``wait_for``
    returns the result of a send that finished as the cancellation came, dropping it
    (python/cpython#86296): without this, ``aclose`` would wait for the listener forever.
    The request is still counted by ``Task.cancelling()``."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class LocalSessionCache:
    """Owns its subscriber task (``start``/``aclose``); borrows the store's Redis client
    (and on a Cluster, opens and closes its own connection to the node it subscribes to)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        channel: str,
        metrics: Metrics,
        *,
        max_age_s: float,
        max_entries: int,
        absolute_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._client = client
        self._channel = channel
        self._metrics = metrics
        self._hits = metrics.child(metrics.session_cache_total, "hit")  # every cached read
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._absolute_timeout_s = absolute_timeout_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._loading: SingleFlight[str, Session | None] = SingleFlight("session-load")
        self._generation = 0  # counts invalidations (and resets): a racing load is not kept
        self._serving = False  # True only while the subscription is confirmed
        # Copies are served until then (clock): a heartbeat sent before it came back. 0
        # while not serving, so this one check covers both.
        self._heard_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._feed_node: str | None = None  # Cluster: the node subscribed to last
        # For whoever must know (readiness, tests): serving or not, and any invalidation.
        self._on = asyncio.Event()
        self._off = asyncio.Event()
        self._off.set()
        self._dropped = asyncio.Event()
        # Refresh-lock waiters by storage id, woken by a release published on any replica;
        # session watchers, woken by a write or an end of their session.
        self._lock_waiters = Waiters()
        self._session_waiters = Waiters()

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def serving(self) -> bool:
        return self._serving

    def get(self, storage_id: str) -> Session | None:
        """The kept copy, counted as a ``hit``; a miss is counted by ``coalesce``."""
        entry = self._entries.get(storage_id)  # none while not serving: emptied, not kept
        if entry is None:
            return None
        session, until = entry
        now = self._clock()
        if until <= now:
            del self._entries[storage_id]
            return None
        if self._heard_until <= now:
            return None  # not serving, or the feed is late: an invalidation may be on its way
        self._hits.inc()
        return session

    def _count(self, result: str) -> None:
        metrics = self._metrics
        metrics.child(metrics.session_cache_total, result).inc()

    def put(self, storage_id: str, session: Session, generation: int) -> None:
        """Keep ``session``, loaded from Redis when the generation was ``generation``."""
        if not self._serving or generation != self._generation:
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
        ``off`` (the cache is not serving: every caller loads)."""
        if self._heard_until <= self._clock():  # 0 while not serving
            self._count("off")
            return await load()
        self._count("miss" if self._loading.running(storage_id) is None else "shared")
        # One caller going away (client gone) never cancels the others' load.
        return await self._loading.join(storage_id, load)

    @property
    def loads_under_way(self) -> int:
        """Sessions being loaded from Redis now, each once for all its callers."""
        return len(self._loading)

    def drop(self, storage_id: str) -> None:
        self._generation += 1
        self._entries.pop(storage_id, None)
        self._loading.forget(storage_id)  # later callers must not join an older read
        self._dropped.set()
        self._lock_waiters.wake(storage_id)  # a changed session: worth a look at its lock
        self._session_waiters.wake(storage_id)

    def lock_released(
        self, storage_id: str
    ) -> contextlib.AbstractContextManager[asyncio.Future[None]]:
        """A future done when a release of ``storage_id``'s refresh lock is published (see
        ``unlock_message``), when its session changes, or when the feed goes down. Enter it
        *before* looking at the lock, so that a release in between is not missed."""
        return self._lock_waiters.waiting(storage_id)

    def session_changed(
        self, storage_id: str
    ) -> contextlib.AbstractContextManager[asyncio.Future[None]]:
        """A future done when a write or an end of ``storage_id``'s session is published
        (by any replica, this one at once), or when the feed goes down or comes back (news
        may have been lost). Enter it *before* loading the session."""
        return self._session_waiters.waiting(storage_id)

    @property
    def watched(self) -> int:
        """How many sessions are watched now (``session_changed``)."""
        return len(self._session_waiters)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._listen(), name="session-cache-invalidations"
        )

    async def wait_serving(self, serving: bool, timeout_s: float) -> None:
        """Return once the cache is serving (or off); ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            await (self._on if serving else self._off).wait()

    async def wait_dropped(self, generation: int, timeout_s: float) -> None:
        """Return once a copy was dropped after ``generation``; ``TimeoutError`` if not."""
        async with asyncio.timeout(timeout_s):
            while self._generation == generation:
                self._dropped.clear()
                await self._dropped.wait()

    async def aclose(self) -> None:
        self._stop_serving()
        await self._loading.aclose()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _wake_all_waiters(self) -> None:
        self._lock_waiters.wake_all()
        self._session_waiters.wake_all()

    def _stop_serving(self) -> None:
        self._wake_all_waiters()  # no news will reach them now: they poll
        self._serving = False
        self._heard_until = 0.0
        self._on.clear()
        self._off.set()
        self._entries.clear()
        self._loading.forget_all()
        self._generation += 1

    async def _listen(self) -> None:
        backoff_s = _BACKOFF_FIRST_S
        while True:
            _raise_if_cancelled()
            try:
                async with self._subscriber() as client:
                    pubsub = client.pubsub()
                    try:
                        await pubsub.subscribe(self._channel)
                        await self._follow(pubsub)
                    finally:
                        with contextlib.suppress(RedisError, OSError):
                            await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            # RedisClusterException ("no node reachable") is no RedisError.
            except (RedisError, RedisClusterException, OSError) as exc:
                if self._serving:
                    log.warning(
                        "session_cache",
                        extra={"state": "off", "error_type": type(exc).__name__},
                    )
                    backoff_s = _BACKOFF_FIRST_S  # it worked until now: retry soon
                self._stop_serving()
                self._metrics.session_store_errors_total.inc()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)

    @contextlib.asynccontextmanager
    async def _subscriber(self) -> AsyncIterator[Redis]:
        """The client to subscribe with: the store's own, or on a Cluster a client of one
        node (see the module's docstring), closed when the subscription ends."""
        client = self._client
        if not isinstance(client, RedisCluster):
            yield client
            return
        await client.initialize()  # its node list, read again after a failure it saw
        node = _next_node(client.get_primaries() + client.get_replicas(), self._feed_node)
        self._feed_node = node.name
        options = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}  # _listen retries
        node_client = Redis.from_pool(
            ConnectionPool(connection_class=node.connection_class, **options)
        )
        try:
            yield node_client
        finally:
            with contextlib.suppress(RedisError, OSError):
                await node_client.aclose()

    async def _follow(self, pubsub: PubSub) -> None:
        """Apply what the subscription brings, and keep proving it alive; raises when the
        connection fails or falls silent."""
        beats: deque[tuple[str, float]] = deque()  # heartbeats unanswered: payload, sent at
        sequence = 0
        next_beat = self._clock()
        while True:
            _raise_if_cancelled()
            timeout_s = _READ_TIMEOUT_S
            if self._serving:
                now = self._clock()
                if beats and now - beats[0][1] > _SILENT_S:
                    raise FeedSilentError(f"no answer to a PING for {_SILENT_S:g} s")
                if now >= next_beat:
                    sequence += 1
                    payload = f"{_HEARTBEAT}{sequence}"
                    beats.append((payload, now))
                    await pubsub.ping(payload)
                    next_beat = now + _HEARTBEAT_S
                timeout_s = min(timeout_s, max(next_beat - now, 0.0))
            message = await pubsub.get_message(timeout=timeout_s)
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                for word in bytes(message["data"]).decode().split():
                    if word.startswith(_UNLOCK):
                        self._lock_waiters.wake(word[len(_UNLOCK) :])
                    else:
                        self.drop(word)
            elif kind == "pong":
                answered = bytes(message["data"]).decode()
                while beats:  # answers come in order: earlier ones are not coming
                    payload, sent_at = beats.popleft()
                    if payload == answered:
                        self._heard_until = sent_at + _FRESH_S
                        break
            elif kind == "subscribe":
                # Confirmed: from here on no invalidation can pass us unseen. It comes
                # again after redis-py reconnected on its own: what was published in
                # between is lost, so every copy goes, and so do PINGs sent before.
                self._entries.clear()
                self.drop("")
                self._wake_all_waiters()  # a release or an end may have been lost too
                beats.clear()
                now = self._clock()
                self._heard_until = now + _FRESH_S
                next_beat = now
                self._serving = True
                self._off.clear()
                self._on.set()
                log.info("session_cache", extra={"state": "serving"})


def _next_node(nodes: list[ClusterNode], last: str | None) -> ClusterNode:
    """The node after ``last`` in ``nodes`` (the first one if ``last`` is not there)."""
    if not nodes:
        raise RedisError("the cluster client knows no node")
    names = [node.name for node in nodes]
    turn = names.index(last) + 1 if last in names else 0
    return nodes[turn % len(nodes)]
