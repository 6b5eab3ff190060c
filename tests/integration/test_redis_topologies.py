"""The session store and its local cache on Redis Sentinel (passwords and TLS on the
sentinels and the master) and on Redis Cluster, each started once for the module.

Every operation works, and invalidations reach a second replica. A master killed with
SIGKILL under load: the store fails with ``SessionStoreUnavailableError`` and nothing else,
recovers by itself once the topology has failed over, and its local cache comes back on; no
"Unclosed" resource warning or error line is left behind. The outage as the store sees it
(first failure to first success) and the cache's hit rate on a Cluster next to a single
Redis are printed (``pytest -s``) for the README's "Scaling out".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot

from gateway.errors import SessionStoreUnavailableError
from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session, SessionHandle
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings
from tests.support.feed import feed_of, hearing, wait_subscribed
from tests.support.metrics import session_cache_reads
from tests.support.redis_server import RedisServerProcess
from tests.support.redis_topologies import SERVICE, ClusterTopology, SentinelTopology

pytestmark = pytest.mark.integration

PREFIX = "tgt"
CHANNEL = f"{PREFIX}:invalidate"
WAIT_S = 10.0
RECOVERY_S = 30.0  # a failover on loopback takes 2-4 s; this only bounds a broken one
PROBE_EVERY_S = 0.01  # the pace of the store's calls during a failover (its resolution)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelTopology]:
    topology = SentinelTopology(master_password="m@ster pw", sentinel_password="s3nt+nel", tls=True)
    with topology:
        yield topology


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    with ClusterTopology() as topology:
        yield topology


def session_settings(url: str) -> SessionSettings:
    return SessionSettings(redis_url=url, key_prefix=PREFIX, local_cache_s=30)


@dataclasses.dataclass(frozen=True)
class Replicas:
    """Two stores on one Redis, as two tokengate replicas; ``metrics`` are ``a``'s."""

    a: RedisSessionStore
    b: RedisSessionStore
    metrics: Metrics


@contextlib.asynccontextmanager
async def two_replicas(url: str) -> AsyncIterator[Replicas]:
    """Two stores on ``url``, their caches serving."""
    stores: list[RedisSessionStore] = []
    metrics = [Metrics(), Metrics()]
    try:
        for registry in metrics:
            settings = session_settings(url)
            store = RedisSessionStore(settings, build_redis(settings), registry)
            stores.append(store)
            store.start()
            await wait_subscribed(feed_of(store), timeout_s=WAIT_S)
        yield Replicas(stores[0], stores[1], metrics[0])
    finally:
        for store in stores:
            await store.aclose()


def new_session(subject: str = "alice") -> tuple[SessionHandle, Session]:
    handle = derive_handle(secrets.token_bytes(32))
    session = Session(
        subject=subject,
        access_token="access-1",
        access_expires_at=time.time() + 300,
        refresh_token="refresh-1",
        scopes=("api.read",),
        claims={"sub": subject},
    )
    return handle, session


def slot_of(handle: SessionHandle) -> int:
    return key_slot(f"{PREFIX}:{{{handle.storage_id}}}:s".encode())


@contextlib.contextmanager
def unclosed_reports() -> Iterator[list[str]]:
    """Every ResourceWarning and every "Unclosed ..." report to the loop's exception handler
    (redis-py's ``__del__`` does both; asyncio's default handler logs it as an error line)
    while inside, and after a garbage collection on the way out. Garbage from before is
    collected first: it is not this test's."""
    gc.collect()
    reports: list[str] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        reports.append(str(context.get("message")))

    loop.set_exception_handler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            yield reports
            gc.collect()
        reports.extend(str(w.message) for w in caught if issubclass(w.category, ResourceWarning))
    finally:
        loop.set_exception_handler(previous)


async def exercise(a: RedisSessionStore, b: RedisSessionStore) -> None:
    """Each operation of the store on ``a``; what ``b`` keeps and hears of it."""
    handle, session = new_session()
    created = await a.create(handle, session)
    copy = await b.load(handle, cached=True)
    assert copy is not None
    assert await b.load(handle, cached=True) == copy  # kept
    with hearing(feed_of(b)) as news:
        saved = await a.save(handle, dataclasses.replace(created, access_token="access-2"))
        assert saved is not None
        await news.invalidation(handle.storage_id, timeout_s=WAIT_S)
    fresh = await b.load(handle, cached=True)
    assert fresh is not None
    assert (fresh.access_token, fresh.version) == ("access-2", saved.version)

    # The refresh lock: b waits, a's release is published and wakes it.
    assert await a.acquire_lock(handle, "holder", 30)
    assert not await b.acquire_lock(handle, "other", 30)
    waiter = asyncio.create_task(b.wait_for_unlock(handle, 30))
    assert await a.release_lock(handle, "holder")
    async with asyncio.timeout(WAIT_S):
        await waiter

    # A watched session (an open WebSocket) hears its end.
    with b.watch(handle.storage_id) as watch:
        assert watch.told
        assert await a.delete(handle)
        async with asyncio.timeout(WAIT_S):
            await watch.changed
    assert await b.load(handle, cached=True) is None

    # Logins and back-channel logout by subject, across slots.
    handles = [new_session("bob")[0] for _ in range(6)]
    for other in handles:
        await a.create(other, new_session("bob")[1])
        assert await b.load(other, cached=True) is not None
    with hearing(feed_of(b)) as news:
        assert await a.delete_by_subject("bob") == 6
        # Six publications, from up to three masters: each arrives on its own.
        await news.invalidation(*(other.storage_id for other in handles), timeout_s=WAIT_S)
    for other in handles:
        assert await b.load(other, cached=True) is None
    token_id = secrets.token_hex(8)
    assert await a.remember_once("jti", token_id, 60)
    assert not await b.remember_once("jti", token_id, 60)


async def test_the_store_works_through_sentinels_that_require_a_password_over_tls(
    sentinel: SentinelTopology,
) -> None:
    assert sentinel.url.startswith("rediss+sentinel://")
    with unclosed_reports() as unclosed:
        async with two_replicas(sentinel.url) as replicas:
            await exercise(replicas.a, replicas.b)
        del replicas
    assert unclosed == []


async def test_the_store_and_its_cache_work_on_a_cluster(cluster: ClusterTopology) -> None:
    with unclosed_reports() as unclosed:
        async with two_replicas(cluster.url) as replicas:
            # Both subscribed to one node; sessions land on every master and are heard there.
            assert len(cluster.subscribed_to(CHANNEL)) == 1
            await exercise(replicas.a, replicas.b)
            masters = {cluster.master_of_slot(slot_of(new_session()[0])).port for _ in range(60)}
            assert len(masters) == 3
        del replicas
    assert unclosed == []


class FakeSentinel:
    """Answers SENTINEL MASTERS once ``answer`` is set: the master, or none it trusts."""

    def __init__(self, *, knows_master: bool) -> None:
        self.knows_master = knows_master
        self.answer = asyncio.Event()
        self.asked = 0
        self.asked_twice = asyncio.Event()

    async def sentinel_masters(self) -> dict[str, dict[str, Any]]:
        self.asked += 1
        if self.asked == 2:
            self.asked_twice.set()
        await self.answer.wait()
        if not self.knows_master:
            return {}
        state = {"ip": "10.0.0.9", "port": 6379, "is_master": True, "num-other-sentinels": 2}
        return {SERVICE: {**state, "is_sdown": False, "is_odown": False}}


async def test_two_master_lookups_at_once_keep_every_sentinel() -> None:
    """In a failover every connection asks the sentinels at once. redis-py 7.4 moved the
    sentinel that answered to the front by its index from before the wait, and here wrote
    the second sentinel twice and lost the first (never asked again, never closed)."""
    first, second, third = (FakeSentinel(knows_master=k) for k in (False, True, True))
    first.answer.set()
    third.answer.set()
    client = build_redis(session_settings("redis+sentinel://s1,s2,s3/" + SERVICE))
    try:
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        manager = pool.sentinel_manager
        real, manager.sentinels = manager.sentinels, [first, second, third]
        try:
            lookups = [asyncio.create_task(manager.discover_master(SERVICE)) for _ in range(2)]
            async with asyncio.timeout(WAIT_S):
                await second.asked_twice.wait()  # both lookups wait on the second sentinel
                second.answer.set()
                assert await asyncio.gather(*lookups) == [("10.0.0.9", 6379)] * 2
            assert manager.sentinels == [second, first, third]
        finally:
            manager.sentinels = real
    finally:
        await client.aclose()


@dataclasses.dataclass
class Outage:
    """What the store saw while a master died and the topology failed over."""

    calls: int = 0
    failures: int = 0
    first_failure: float | None = None
    recovered_at: float | None = None
    recovered: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def seconds(self) -> float:
        assert self.first_failure is not None
        assert self.recovered_at is not None
        return self.recovered_at - self.first_failure


async def probe(store: RedisSessionStore, handle: SessionHandle, outage: Outage) -> None:
    """Load and save ``handle`` until a success follows a failure; any error but the store's
    own fails the test. (It ends by itself: a cancellation can be lost in redis-py on
    Python 3.11, see ``feed._raise_if_cancelled``.)"""
    while not outage.recovered.is_set():
        outage.calls += 1
        try:
            session = await store.load(handle)
            assert session is not None
            assert await store.save(handle, session) is not None
        except SessionStoreUnavailableError:
            outage.failures += 1
            if outage.first_failure is None:
                outage.first_failure = time.monotonic()
        else:
            if outage.first_failure is not None and outage.recovered_at is None:
                outage.recovered_at = time.monotonic()
                outage.recovered.set()
        await asyncio.sleep(PROBE_EVERY_S)  # a pace, not a wait: Redis refuses at once


async def ride_out(
    store: RedisSessionStore, handle: SessionHandle, kill: Callable[[], float]
) -> Outage:
    """Run ``kill`` (kill a master, wait for the failover; its seconds) under the probe."""
    outage = Outage()
    task = asyncio.create_task(probe(store, handle, outage))
    try:
        await asyncio.sleep(0.1)  # a few calls before: the pooled connections are open
        assert outage.failures == 0
        failover_s = await asyncio.to_thread(kill)
        async with asyncio.timeout(RECOVERY_S):
            await task
    finally:
        task.cancel()  # only if the store never came back
    print(
        f"\nfailover (topology) {failover_s:.2f} s, store unavailable {outage.seconds:.2f} s,"
        f" {outage.failures} of {outage.calls} calls failed"
    )
    return outage


async def fail_over_sentinel(sentinel: SentinelTopology) -> None:
    async with two_replicas(sentinel.url) as replicas:
        a, b = replicas.a, replicas.b
        handle, session = new_session()
        await a.create(handle, session)

        def kill() -> float:
            old = sentinel.master_port()
            sentinel.kill_master()
            return sentinel.wait_for_failover(old)

        outage = await ride_out(a, handle, kill)
        assert outage.failures > 0
        for store in (a, b):
            await wait_subscribed(feed_of(store), timeout_s=WAIT_S)
        await exercise(a, b)


async def test_a_killed_sentinel_master_fails_over_and_the_store_recovers_by_itself(
    sentinel: SentinelTopology,
) -> None:
    with unclosed_reports() as unclosed:
        await fail_over_sentinel(sentinel)  # its clients closed and gone on return
    assert unclosed == []


async def fail_over_cluster(cluster: ClusterTopology) -> None:
    async with two_replicas(cluster.url) as replicas:
        a, b = replicas.a, replicas.b
        (feed,) = cluster.subscribed_to(CHANNEL)
        assert feed in cluster.masters()
        handle, session = new_session()
        while cluster.master_of_slot(slot_of(handle)) is not feed:
            handle = new_session()[0]
        await a.create(handle, session)
        assert await b.load(handle, cached=True) is not None

        def kill() -> float:
            slot = slot_of(handle)
            killed = cluster.kill_master_of_slot(slot)
            return cluster.wait_for_failover(slot, killed)

        outage = await ride_out(a, handle, kill)
        assert outage.failures > 0
        for store in (a, b):
            await wait_subscribed(feed_of(store), timeout_s=WAIT_S)
        assert feed not in cluster.subscribed_to(CHANNEL)
        await exercise(a, b)


async def test_a_killed_cluster_master_fails_over_and_the_store_and_its_cache_recover(
    cluster: ClusterTopology,
) -> None:
    """The node the caches subscribe to is the master that dies: they go off, subscribe to
    another node, and serve again. The scripts run on the promoted replica too (redis-py
    7.4 kept calling it a replica and never loaded them there: NoScriptError for good)."""
    with unclosed_reports() as unclosed:
        await fail_over_cluster(cluster)  # its clients closed and gone on return
    assert unclosed == []


async def cached_loads(replicas: Replicas) -> tuple[float, float]:
    """2,000 cached loads on ``a`` over 20 sessions, one of them rewritten by ``b`` every
    100: the hit rate and the microseconds per load."""
    store, writer = replicas.a, replicas.b
    sessions = []
    for _ in range(20):
        handle, session = new_session()
        sessions.append((handle, await writer.create(handle, session)))
    started = time.perf_counter()
    for i in range(2000):
        handle, _ = sessions[i % 20]
        if i % 100 == 99:
            current = await writer.load(handle)
            assert current is not None
            assert await writer.save(handle, current) is not None
        assert await store.load(handle, cached=True) is not None
    elapsed_s = time.perf_counter() - started
    reads = session_cache_reads(replicas.metrics)
    return reads.get("hit", 0) / 2000, elapsed_s / 2000 * 1e6


async def test_the_local_cache_serves_as_many_loads_on_a_cluster_as_on_a_single_redis(
    cluster: ClusterTopology,
) -> None:
    with unclosed_reports() as unclosed, RedisServerProcess() as single:
        async with two_replicas(single.url) as replicas:
            single_hits, single_us = await cached_loads(replicas)
        async with two_replicas(cluster.url) as replicas:
            cluster_hits, cluster_us = await cached_loads(replicas)
        del replicas
    assert unclosed == []
    print(
        f"\ncached loads: single Redis {single_hits:.1%} hits, {single_us:.0f} µs/load;"
        f" Cluster {cluster_hits:.1%} hits, {cluster_us:.0f} µs/load"
    )
    assert cluster_hits >= single_hits - 0.02
    assert cluster_hits > 0.9
