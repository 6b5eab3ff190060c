"""The invalidation feed: what every replica hears of the sessions' writes, ends and locks.

Every write or end of a session, on any replica, is published on ``<prefix>:invalidate``
(Redis pub/sub) by the store's Lua scripts, in the same step as the write; so is the release
of a refresh lock (``redis_store``'s ``_COMPARE_AND_SET``, ``_DELETE`` and ``_RELEASE``,
given the messages built here; ``tests/integration/test_session_feed.py`` runs them on a
real Redis and parses what they publish). This module owns that channel: its name and
message format (encoders for the scripts' arguments, the parser of what arrives), the
subscription that hears it, and the rule that says when what it heard can be trusted.
Listeners (``FeedListener``) are told:

- ``on_invalidate(storage_id)``: the session was written or ended (a message that is a
  storage id; several, separated by spaces, are allowed: an operator may end many at once);
- ``on_unlock(storage_id)``: its refresh lock was released (``unlock:<storage id>``; a
  replica that predates it drops nothing real);
- ``on_up()``: subscribed, or subscribed again: whatever was published before may have been
  lost, so what a listener learned earlier is suspect;
- ``on_down()``: the subscription failed or fell silent: no news arrives until ``on_up``.

The liveness rule. A connection can die without a word (a NAT or load balancer forgetting
an idle flow, a failover behind a proxy): the subscriber only reads, so it would wait
forever while the invalidations go elsewhere, and redis-py's own health check sends a PING
but never looks for the answer. So the feed sends a PING of its own on the subscription
every ``Heartbeat.every_s``, and it is ``live`` only while a PING sent at most
``Heartbeat.fresh_s`` ago has come back: Redis answers in order, so by then every message
published before that PING has been told. Past ``Heartbeat.silent_s`` without an answer the
connection is given up (``on_down``) and a new one subscribes, with backoff.

On a Redis Cluster the subscription is a connection of its own to one node (redis-py's
cluster client has no asyncio pub/sub): a PUBLISH, from a script too, is sent to every node
over the cluster bus, so any node hears every message. The node is the cluster client's
first primary (an arbitrary choice: any would do), then the next node in its list each time
a subscription ends (a node that failed over or died), with the client's credentials, TLS
and timeouts (``RedisSubscriber``).

What listeners do with the news (keep copies: ``local_cache``; wake a request waiting for a
lock or a WebSocket watching its session: ``Wakeups``) is theirs; the scripts that publish,
and the keys, are ``redis_store``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.metrics import Metrics
from gateway.sessions.model import Waiters

log = logging.getLogger(__name__)

UNLOCK = "unlock:"  # before a storage id: its refresh lock was released
_HEARTBEAT = "hb:"  # our PINGs' payload prefix (redis-py's own health check is filtered)
_READ_TIMEOUT_S = 1.0  # a read waits this long, then loops (and notices a cancellation)
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0


def channel_of(key_prefix: str) -> str:
    """The channel, ``<session.key_prefix>:invalidate``."""
    return f"{key_prefix}:invalidate"


def invalidation_message(storage_id: str) -> str:
    """What a write or an end of a session publishes: its storage id."""
    return storage_id


def unlock_message(storage_id: str) -> str:
    """What a release of a session's refresh lock publishes."""
    return UNLOCK + storage_id


class FeedMessage(NamedTuple):
    kind: Literal["invalidate", "unlock"]
    storage_id: str


def parse_message(data: bytes | str) -> list[FeedMessage]:
    """What one published message says, word by word (space-separated)."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return [
        FeedMessage("unlock", word[len(UNLOCK) :])
        if word.startswith(UNLOCK)
        else FeedMessage("invalidate", word)
        for word in text.split()
    ]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The liveness rule's timings (see the module's docstring)."""

    every_s: float = 1.0  # a PING on the subscription this often
    fresh_s: float = 2.0  # live while a PING sent at most this long ago was answered
    silent_s: float = 5.0  # a PING unanswered this long: the connection is dead


class FeedSilentError(ConnectionError):
    """The subscription stopped answering its heartbeat: half-open, or Redis stuck."""


class Subscription(Protocol):
    """A confirmed-or-soon subscription to the channel, as redis-py's ``PubSub`` is one:
    ``get_message`` brings ``{"type": "subscribe" | "message" | "pong", "data": ...}``."""

    def ping(self, message: str) -> Awaitable[object]: ...

    async def get_message(self, *, timeout: float) -> dict[str, Any] | None: ...  # noqa: ASYNC109  # redis-py's signature


Connect = Callable[[], contextlib.AbstractAsyncContextManager[Subscription]]


class FeedListener:
    """What the feed tells; a listener overrides what it needs. Called on the feed's task
    (``invalidated_here``: the caller's), one at a time, never awaited: keep it quick."""

    def on_invalidate(self, storage_id: str) -> None:
        """A write or an end of the session was published (or made by this process)."""

    def on_unlock(self, storage_id: str) -> None:
        """The session's refresh lock was released."""

    def on_up(self) -> None:
        """Subscribed (again): news published before may have been lost."""

    def on_down(self) -> None:
        """No news will come until ``on_up``."""


class FeedState(Protocol):
    """What a listener may ask of the feed."""

    @property
    def subscribed(self) -> bool: ...

    @property
    def live(self) -> bool: ...


def _raise_if_cancelled() -> None:
    """Raise a cancellation of this task that a library swallowed. redis-py sends with
    ``asyncio.wait_for`` when ``socket_timeout`` is set, and on Python 3.11 ``wait_for``
    returns the result of a send that finished as the cancellation came, dropping it
    (python/cpython#86296): without this, ``aclose`` would wait for the listener forever.
    The request is still counted by ``Task.cancelling()``."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class InvalidationFeed:
    """Owns its listening task (``start``/``aclose``) and each subscription ``connect``
    opens; tells its listeners, in the order they were added."""

    def __init__(
        self,
        connect: Connect,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        heartbeat: Heartbeat = Heartbeat(),
    ) -> None:
        self._connect = connect
        self._metrics = metrics
        self._clock = clock
        self._heartbeat = heartbeat
        self._listeners: list[FeedListener] = []
        self._subscribed = False
        # Live until then (clock): a heartbeat sent before it came back. 0 while not
        # subscribed, so this one check covers both.
        self._live_until = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        """The subscription is confirmed: a message published from now on will be told."""
        return self._subscribed

    @property
    def live(self) -> bool:
        """Subscribed, and every message published more than ``Heartbeat.fresh_s`` ago
        has been told."""
        return self._live_until > self._clock()

    def add_listener(self, listener: FeedListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: FeedListener) -> None:
        self._listeners.remove(listener)

    def invalidated_here(self, storage_id: str) -> None:
        """This process wrote or ended the session: its listeners hear it now, not one
        round trip later when the publish comes back (the others hear the publish)."""
        for listener in list(self._listeners):
            listener.on_invalidate(storage_id)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._listen(), name="session-invalidation-feed"
        )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._went_down()

    def _went_down(self) -> None:
        if not self._subscribed:
            return
        self._subscribed = False
        self._live_until = 0.0
        for listener in list(self._listeners):
            listener.on_down()

    def _came_up(self) -> None:
        self._subscribed = True
        for listener in list(self._listeners):
            listener.on_up()

    async def _listen(self) -> None:
        backoff_s = _BACKOFF_FIRST_S
        while True:
            _raise_if_cancelled()
            try:
                async with self._connect() as subscription:
                    await self._follow(subscription)
            # RedisClusterException ("no node reachable") is no RedisError.
            except (RedisError, RedisClusterException, OSError) as exc:
                if self._subscribed:
                    log.warning(
                        "session_cache",
                        extra={"state": "off", "error_type": type(exc).__name__},
                    )
                    backoff_s = _BACKOFF_FIRST_S  # it worked until now: retry soon
                self._went_down()
                self._metrics.session_store_errors_total.inc()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)

    async def _follow(self, subscription: Subscription) -> None:
        """Tell what the subscription brings, and keep proving it alive; raises when the
        connection fails or falls silent."""
        heartbeat = self._heartbeat
        beats: deque[tuple[str, float]] = deque()  # heartbeats unanswered: payload, sent at
        sequence = 0
        next_beat = self._clock()
        while True:
            _raise_if_cancelled()
            timeout_s = _READ_TIMEOUT_S
            if self._subscribed:
                now = self._clock()
                if beats and now - beats[0][1] > heartbeat.silent_s:
                    raise FeedSilentError(f"no answer to a PING for {heartbeat.silent_s:g} s")
                if now >= next_beat:
                    sequence += 1
                    payload = f"{_HEARTBEAT}{sequence}"
                    beats.append((payload, now))
                    await subscription.ping(payload)
                    next_beat = now + heartbeat.every_s
                timeout_s = min(timeout_s, max(next_beat - now, 0.0))
            message = await subscription.get_message(timeout=timeout_s)
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                for heard in parse_message(bytes(message["data"])):
                    for listener in list(self._listeners):
                        if heard.kind == "unlock":
                            listener.on_unlock(heard.storage_id)
                        else:
                            listener.on_invalidate(heard.storage_id)
            elif kind == "pong":
                answered = bytes(message["data"]).decode()
                while beats:  # answers come in order: earlier ones are not coming
                    payload, sent_at = beats.popleft()
                    if payload == answered:
                        self._live_until = sent_at + heartbeat.fresh_s
                        break
            elif kind == "subscribe":
                # Confirmed: from here on no message can pass us unseen. It comes again
                # after redis-py reconnected on its own: what was published in between is
                # lost, and so are PINGs sent before.
                beats.clear()
                now = self._clock()
                self._live_until = now + heartbeat.fresh_s
                next_beat = now
                self._came_up()
                log.info("session_cache", extra={"state": "serving"})


class RedisSubscriber:
    """``connect`` for a feed on a store's client: borrows the client, or on a Cluster opens
    and closes a client of one node (see the module's docstring) for each subscription."""

    def __init__(self, client: Redis | RedisCluster, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._node: str | None = None  # Cluster: the node subscribed to last

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        async with self._subscriber() as client:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                yield pubsub
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    @contextlib.asynccontextmanager
    async def _subscriber(self) -> AsyncIterator[Redis]:
        client = self._client
        if not isinstance(client, RedisCluster):
            yield client
            return
        await client.initialize()  # its node list, read again after a failure it saw
        node = _next_node(client.get_primaries() + client.get_replicas(), self._node)
        self._node = node.name
        # No retry of its own: the feed subscribes anew, with backoff.
        options = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        node_client = Redis.from_pool(
            ConnectionPool(connection_class=node.connection_class, **options)
        )
        try:
            yield node_client
        finally:
            with contextlib.suppress(RedisError, OSError):
                await node_client.aclose()


def _next_node(nodes: list[ClusterNode], last: str | None) -> ClusterNode:
    """The node after ``last`` in ``nodes`` (the first one if ``last`` is not there)."""
    if not nodes:
        raise RedisError("the cluster client knows no node")
    names = [node.name for node in nodes]
    turn = names.index(last) + 1 if last in names else 0
    return nodes[turn % len(nodes)]


class Wakeups(FeedListener):
    """Futures for whoever waits on news of one session: a request waiting for its refresh
    lock (``lock_released``), a WebSocket that must end with its session
    (``session_changed``). Each is done by the news, or by the feed going down or coming
    back (news may have been lost): the waiter then looks for itself."""

    def __init__(self) -> None:
        self._unlocks = Waiters()
        self._changes = Waiters()

    def lock_released(
        self, storage_id: str
    ) -> contextlib.AbstractContextManager[asyncio.Future[None]]:
        """Done when a release of ``storage_id``'s refresh lock is published, or its session
        changes. Enter it *before* looking at the lock, so that a release in between is not
        missed."""
        return self._unlocks.waiting(storage_id)

    def session_changed(
        self, storage_id: str
    ) -> contextlib.AbstractContextManager[asyncio.Future[None]]:
        """Done when a write or an end of ``storage_id``'s session is published (by any
        replica, this one at once). Enter it *before* loading the session."""
        return self._changes.waiting(storage_id)

    @property
    def watched(self) -> int:
        """How many sessions are watched now (``session_changed``)."""
        return len(self._changes)

    @property
    def locks_awaited(self) -> int:
        """How many sessions' locks are waited for now (``lock_released``)."""
        return len(self._unlocks)

    def on_invalidate(self, storage_id: str) -> None:
        self._unlocks.wake(storage_id)  # a changed session: worth a look at its lock
        self._changes.wake(storage_id)

    def on_unlock(self, storage_id: str) -> None:
        self._unlocks.wake(storage_id)

    def on_up(self) -> None:
        self._wake_all()

    def on_down(self) -> None:
        self._wake_all()

    def _wake_all(self) -> None:
        self._unlocks.wake_all()
        self._changes.wake_all()
