"""The invalidation feed without Redis: its messages, its heartbeat and liveness rule, and
what it tells, driven through scripted subscriptions given as its ``connect``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.metrics import Metrics
from gateway.sessions.feed import (
    FeedMessage,
    Heartbeat,
    InvalidationFeed,
    Subscription,
    Wakeups,
    channel_of,
    invalidation_message,
    parse_message,
    unlock_message,
)
from tests.support.feed import FeedNews, hearing

BEAT = Heartbeat()  # the production timings: the clock is scripted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SubscriptionLost(ConnectionError):
    """A scripted subscription's connection failing."""


Step = Callable[["ScriptedSubscription"], dict[str, Any] | None]


class ScriptedSubscription:
    """A subscription whose every read is the next step of a script (a step may move the
    clock, or fail); then reads wait for ever, as on an idle connection. Records PINGs."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = deque(steps)
        self.pings: list[str] = []
        self.read_all = asyncio.Event()

    async def ping(self, message: str) -> None:
        self.pings.append(message)

    async def get_message(self, *, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109  # redis-py's signature
        await asyncio.sleep(0)
        if not self.steps:
            self.read_all.set()
            await asyncio.Event().wait()
        return self.steps.popleft()(self)


class Script:
    """The feed's ``connect``: each subscription it opens is the next one given; after the
    last, connecting waits for ever."""

    def __init__(self, *subscriptions: ScriptedSubscription) -> None:
        self.subscriptions = deque(subscriptions)
        self.closed = 0

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Subscription]:
        if not self.subscriptions:
            await asyncio.Event().wait()
        try:
            yield self.subscriptions.popleft()
        finally:
            self.closed += 1


def subscribed(subscription: ScriptedSubscription) -> dict[str, Any]:
    return {"type": "subscribe", "channel": b"ch", "data": 1}


def answer(index: int) -> Step:
    return lambda sub: {"type": "pong", "channel": None, "data": sub.pings[index].encode()}


def wait(clock: Clock, seconds: float) -> Step:
    def step(subscription: ScriptedSubscription) -> None:
        clock.now += seconds

    return step


def published(text: str) -> Step:
    return lambda subscription: {"type": "message", "channel": b"ch", "data": text.encode()}


def fail(subscription: ScriptedSubscription) -> None:
    raise SubscriptionLost("connection reset")


@contextlib.asynccontextmanager
async def running(
    script: Script, clock: Clock | None = None, metrics: Metrics | None = None
) -> AsyncIterator[tuple[InvalidationFeed, FeedNews]]:
    """A started feed on ``script``, heard from its start; closed on exit."""
    feed = InvalidationFeed(script.connect, metrics or Metrics(), clock=clock or Clock())
    with hearing(feed) as news:
        feed.start()
        try:
            yield feed, news
        finally:
            await feed.aclose()


def errors(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("tokengate_session_store_errors_total")


def test_the_messages_read_back_as_what_they_say() -> None:
    assert channel_of("tg") == "tg:invalidate"
    text = " ".join([invalidation_message("a" * 64), unlock_message("b" * 64), "c"])
    assert parse_message(text.encode()) == [
        FeedMessage("invalidate", "a" * 64),
        FeedMessage("unlock", "b" * 64),
        FeedMessage("invalidate", "c"),
    ]
    assert parse_message("  ") == []
    assert parse_message(b"\xff unlock:x") == [  # an operator's garbage drops nothing real
        FeedMessage("invalidate", "\ufffd"),
        FeedMessage("unlock", "x"),
    ]


async def test_published_messages_are_told_to_every_listener_in_order() -> None:
    sub = ScriptedSubscription([subscribed, published("unlock:id other"), published("id")])
    async with running(Script(sub)) as (feed, news):
        with hearing(feed) as second:
            await sub.read_all.wait()
    expected = [("unlock", "id"), ("invalidate", "other"), ("invalidate", "id")]
    assert news.events == [("up", ""), *expected, ("down", "")]  # down: closed
    assert second.events == [("up", ""), *expected]


async def test_the_feed_is_live_only_while_a_recent_heartbeat_came_back() -> None:
    clock = Clock()
    sub = ScriptedSubscription([subscribed, answer(0)])
    async with running(Script(sub), clock) as (feed, _):
        assert not feed.subscribed
        assert not feed.live
        await sub.read_all.wait()
        assert sub.pings == ["hb:1"]  # sent at once on a confirmed subscription
        clock.now += BEAT.fresh_s - 0.01
        assert feed.live
        clock.now += 0.02  # no newer answer: a message may be stuck on the way
        assert not feed.live
        assert feed.subscribed  # late, not down: that takes Heartbeat.silent_s


async def test_an_answer_counts_from_when_its_ping_was_sent() -> None:
    clock = Clock()
    # Two PINGs go out; the answer to the second arrives late, and answers the first too.
    sub = ScriptedSubscription(
        [subscribed, wait(clock, BEAT.every_s), wait(clock, BEAT.every_s), answer(1)]
    )
    async with running(Script(sub), clock) as (feed, _):
        await sub.read_all.wait()
        assert sub.pings == ["hb:1", "hb:2", "hb:3"]
        sent_second = 1000.0 + BEAT.every_s
        clock.now = sent_second + BEAT.fresh_s - 0.01
        assert feed.live
        clock.now = sent_second + BEAT.fresh_s
        assert not feed.live


async def test_a_subscription_that_stops_answering_is_given_up_and_opened_anew() -> None:
    clock = Clock()
    metrics = Metrics()
    silence = [wait(clock, BEAT.every_s)] * int(BEAT.silent_s / BEAT.every_s + 2)
    silent = ScriptedSubscription([subscribed, answer(0), *silence])
    script = Script(silent, ScriptedSubscription([subscribed]))
    async with running(script, clock, metrics) as (feed, news):
        await news.until(lambda: news.ups == 2)
        assert news.events == [("up", ""), ("down", ""), ("up", "")]
        assert len(silent.steps) <= 1  # it gave up soon after the silence passed the limit
        assert len(silent.pings) >= BEAT.silent_s / BEAT.every_s
        assert script.closed == 1
        assert errors(metrics) == 1
        assert feed.subscribed


async def test_a_failed_subscription_is_told_down_and_opened_anew() -> None:
    metrics = Metrics()
    script = Script(ScriptedSubscription([subscribed, fail]), ScriptedSubscription([subscribed]))
    async with running(script, metrics=metrics) as (feed, news):
        await news.until(lambda: news.ups == 2)
        assert news.events == [("up", ""), ("down", ""), ("up", "")]
        assert feed.subscribed
        assert errors(metrics) == 1


async def test_failures_before_any_subscription_tell_nothing_but_are_counted() -> None:
    metrics = Metrics()
    script = Script(ScriptedSubscription([fail]), ScriptedSubscription([subscribed]))
    async with running(script, metrics=metrics) as (_, news):
        await news.until(lambda: news.ups == 1)
        assert news.events == [("up", "")]
        assert errors(metrics) == 1


async def test_a_new_subscription_forgets_pings_sent_before_it() -> None:
    clock = Clock()
    silent = int(BEAT.silent_s / BEAT.every_s)
    # redis-py reconnected on its own: PINGs on the old connection will never be answered.
    steps: list[Step] = [subscribed, *[wait(clock, BEAT.every_s)] * (silent - 1), subscribed]
    steps += [wait(clock, BEAT.every_s), wait(clock, BEAT.every_s), answer(-1)]
    sub = ScriptedSubscription(steps)  # past the first PING's limit, above
    async with running(Script(sub), clock) as (feed, news):
        await sub.read_all.wait()
        assert news.events == [("up", ""), ("up", "")]  # news may have been lost: told
        assert feed.live


async def test_news_from_this_process_is_told_at_once_and_closing_tells_down() -> None:
    sub = ScriptedSubscription([subscribed])
    async with running(Script(sub)) as (feed, news):
        await sub.read_all.wait()
        feed.invalidated_here("id")
        assert news.events == [("up", ""), ("invalidate", "id")]
    assert news.events[-1] == ("down", "")
    assert not feed.subscribed
    assert not feed.live


class SwallowingSubscription(ScriptedSubscription):
    """A PING that finishes as the cancellation comes and returns instead of raising it,
    as redis-py's send through ``asyncio.wait_for`` does on Python 3.11
    (python/cpython#86296); then reads that bring nothing, for ever."""

    def __init__(self) -> None:
        super().__init__([subscribed])
        self.sending = asyncio.Event()

    async def ping(self, message: str) -> None:
        self.pings.append(message)
        self.sending.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    async def get_message(self, *, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109  # redis-py's signature
        if self.steps:
            return await super().get_message(timeout=timeout)
        await asyncio.sleep(0)
        return None


async def test_a_cancellation_swallowed_by_redis_py_still_closes_the_feed() -> None:
    sub = SwallowingSubscription()
    feed = InvalidationFeed(Script(sub).connect, Metrics(), clock=Clock())
    feed.start()
    await sub.sending.wait()
    async with asyncio.timeout(1.0):  # it kept reading, cancelled, until shutdown hung
        await feed.aclose()


async def test_a_lock_waiter_wakes_for_its_release_its_session_or_the_feed() -> None:
    wakeups = Wakeups()
    told: list[Callable[[], None]] = [
        lambda: wakeups.on_unlock("id"),
        lambda: wakeups.on_invalidate("id"),  # its session changed: look at the lock again
        wakeups.on_down,  # no release can reach it any more: it must poll
        wakeups.on_up,  # a release may have been lost
    ]
    for news in told:
        with wakeups.lock_released("id") as released:
            assert wakeups.locks_awaited == 1
            wakeups.on_unlock("other")
            wakeups.on_invalidate("other")
            assert not released.done()
            news()
            assert released.done()
    assert wakeups.locks_awaited == 0


async def test_a_session_watcher_wakes_for_a_write_or_end_or_the_feed_never_an_unlock() -> None:
    wakeups = Wakeups()
    told: list[Callable[[], None]] = [
        lambda: wakeups.on_invalidate("id"),
        wakeups.on_down,
        wakeups.on_up,
    ]
    for news in told:
        with wakeups.session_changed("id") as changed:
            assert wakeups.watched == 1
            wakeups.on_invalidate("other")
            wakeups.on_unlock("id")  # a released refresh lock says nothing of the session
            assert not changed.done()
            news()
            assert changed.done()
    assert wakeups.watched == 0


async def test_wakeups_hear_a_feed() -> None:
    sub = ScriptedSubscription([subscribed, published("unlock:id")])
    wakeups = Wakeups()
    feed = InvalidationFeed(Script(sub).connect, Metrics(), clock=Clock())
    feed.add_listener(wakeups)
    with wakeups.lock_released("id") as released:
        feed.start()
        try:
            await sub.read_all.wait()
            assert released.done()
        finally:
            await feed.aclose()


@pytest.mark.parametrize("kind", ["message", "pong"])
async def test_a_message_of_another_shape_stops_nothing(kind: str) -> None:
    """A PONG of redis-py's own health check, or a payload of no PING of ours, is passed by."""
    data = b"" if kind == "message" else b"redis-py-health-check"
    sub = ScriptedSubscription([subscribed, lambda s: {"type": kind, "data": data}])
    async with running(Script(sub)) as (feed, news):
        await sub.read_all.wait()
        assert news.events == [("up", "")]
        assert feed.live
