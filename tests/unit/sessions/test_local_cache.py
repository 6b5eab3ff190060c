"""The local session cache's bookkeeping, without Redis: age, bounds, and racing loads."""

from __future__ import annotations

from typing import Any

from gateway.metrics import Metrics
from gateway.sessions.local_cache import LocalSessionCache
from gateway.sessions.model import Session


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serving_cache(clock: Clock, **overrides: Any) -> LocalSessionCache:
    options: dict[str, Any] = {"max_age_s": 2.0, "max_entries": 3, "absolute_timeout_s": 3600}
    options.update(overrides)
    cache = LocalSessionCache(None, "ch", Metrics(), clock=clock, **options)  # type: ignore[arg-type]
    cache._serving = True  # as after a confirmed subscription
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
    assert cache.get("id") is None


def test_the_oldest_copy_goes_first_past_the_bound() -> None:
    clock = Clock()
    cache = serving_cache(clock)
    for name in ("a", "b", "c", "d"):
        cache.put(name, session(), cache.generation)
    assert [cache.get(n) is not None for n in ("a", "b", "c", "d")] == [False, True, True, True]
