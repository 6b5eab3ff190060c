"""How fast does a replica waiting on another's refresh lock notice its release?

Compares, on a real redis-server on loopback: the store without its invalidation feed
(poll EXISTS with backoff, 5 ms growing to 50 ms: ``local_cache_s: 0`` or the feed down);
the store with it (the release is published on the feed the local cache already
subscribes to, and wakes the waiters); and bare Redis pub/sub (a subscription per wait), the
lower bound. Prints wake-up delay after release (p50/p99) and Redis commands per wait.

    PYTHONPATH=. .venv/bin/python bench/lock_wait.py
"""

from __future__ import annotations

import asyncio
import statistics
import time

from redis.asyncio import Redis

from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings
from tests.support.redis_server import RedisServerProcess

WAITERS = 3  # one waiter per replica: in-process single flight collapses the rest
TRIALS = 40
HOLD_S = 0.2  # a typical IdP refresh


async def store_waits(url: str, *, feed: bool) -> tuple[list[float], float]:
    settings = SessionSettings(redis_url=url, local_cache_s=5 if feed else 0)
    stores = [RedisSessionStore(settings, build_redis(settings), Metrics()) for _ in range(WAITERS)]
    holder = RedisSessionStore(settings, build_redis(settings), Metrics())
    for store in stores if feed else ():
        store.start()
        assert store.cache is not None
        await store.cache.wait_serving(True, timeout_s=5)
    delays: list[float] = []
    raw = Redis.from_url(url)
    before = int((await raw.info("stats"))["total_commands_processed"])
    for trial in range(TRIALS):
        handle = derive_handle(trial.to_bytes(32, "big"))
        assert await holder.acquire_lock(handle, "holder", 10)
        released: list[float] = []

        async def release(handle=handle, released=released) -> None:  # type: ignore[no-untyped-def]
            await asyncio.sleep(HOLD_S)
            released.append(time.perf_counter())
            await holder.release_lock(handle, "holder")

        async def wait(store: RedisSessionStore, handle=handle) -> float:  # type: ignore[no-untyped-def]
            await store.wait_for_unlock(handle, 5)
            return time.perf_counter()

        woke = await asyncio.gather(release(), *(wait(s, handle) for s in stores))
        delays += [t - released[0] for t in woke[1:]]
    after = int((await raw.info("stats"))["total_commands_processed"])
    for store in [*stores, holder]:
        await store.aclose()
    await raw.aclose()
    return delays, (after - before) / (TRIALS * WAITERS)


async def pubsub(url: str) -> tuple[list[float], float]:
    publisher = Redis.from_url(url)
    delays: list[float] = []
    raw = Redis.from_url(url)
    before = int((await raw.info("stats"))["total_commands_processed"])
    for trial in range(TRIALS):
        channel = f"unlock:{trial}"
        subscribers = [Redis.from_url(url).pubsub() for _ in range(WAITERS)]
        for sub in subscribers:
            await sub.subscribe(channel)
            await sub.get_message(timeout=1)  # the subscribe confirmation
        released: list[float] = []

        async def release(channel=channel, released=released) -> None:  # type: ignore[no-untyped-def]
            await asyncio.sleep(HOLD_S)
            released.append(time.perf_counter())
            await publisher.publish(channel, "1")

        async def wait(sub) -> float:  # type: ignore[no-untyped-def]
            while await sub.get_message(ignore_subscribe_messages=True, timeout=5) is None:
                pass
            return time.perf_counter()

        woke = await asyncio.gather(release(), *(wait(s) for s in subscribers))
        delays += [t - released[0] for t in woke[1:]]
        for sub in subscribers:
            await sub.aclose()
    after = int((await raw.info("stats"))["total_commands_processed"])
    await publisher.aclose()
    await raw.aclose()
    return delays, (after - before) / (TRIALS * WAITERS)


def describe(name: str, delays: list[float], commands: float) -> str:
    ordered = sorted(delays)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return (
        f"{name:<10} wake-up after release p50 {statistics.median(ordered) * 1000:6.2f} ms  "
        f"p99 {p99 * 1000:6.2f} ms  redis commands per wait {commands:5.1f}"
    )


async def main() -> None:
    with RedisServerProcess() as server:
        print(describe("polling", *await store_waits(server.url, feed=False)))
        print(describe("feed", *await store_waits(server.url, feed=True)))
        print(describe("pub/sub", *await pubsub(server.url)))


if __name__ == "__main__":
    asyncio.run(main())
