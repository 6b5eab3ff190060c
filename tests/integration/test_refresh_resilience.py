"""Refresh that survives failover: a real redis-server, panva's oidc-provider, tokengate.

The IdP rotates refresh tokens and revokes a grant whose spent token comes back, so a
rotated token tokengate lost would show as a dead session. Redis is reached through
``RedisLink``, a relay on loopback that can cut the link (connections dropped, new ones
refused: a failover) or silence it (connections accepted, nothing answered: a partition).
Effects are counted where they happen: refresh attempts and grants at the IdP, writes in
Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.app import METRICS, STORE
from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings
from tests.integration.conftest import Bff, start_bff
from tests.integration.test_refresh_concurrency import (
    handle_of,
    refresh_grants,
    replica_config,
    set_expiry,
)
from tests.support.gateway_process import GatewayProcess
from tests.support.idp import OidcProviderProcess
from tests.support.redis_server import RedisServerProcess
from tests.support.redis_topologies import ClusterTopology

pytestmark = pytest.mark.integration


class RedisLink:
    """A TCP relay to a redis-server; ``cut()``, ``silence()`` and ``restore()`` its link."""

    def __init__(self, port: int) -> None:
        self._target_port = port
        self.mode = "up"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> RedisLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def cut(self) -> None:
        """Every connection dropped, new ones closed on arrival (a master gone)."""
        self.mode = "cut"
        for writer in list(self._writers):
            writer.close()

    def silence(self) -> None:
        """Connections stay open and new ones are accepted, but nothing is answered."""
        self.mode = "silent"

    def restore(self) -> None:
        self.mode = "up"

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._pumps.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
            self._pumps.discard(pump)
        for end in (writer, up_writer):
            self._writers.discard(end)
            end.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.mode == "cut":
                    return
                if self.mode == "up":  # silent: swallowed, never answered
                    writer.write(data)
                    await writer.drain()


@contextlib.asynccontextmanager
async def bff_on(idp: OidcProviderProcess, redis_url: str, **overrides: Any) -> AsyncIterator[Bff]:
    bff, server, upstream_server = await start_bff(idp, redis_url, **overrides)
    try:
        yield bff
    finally:
        for browser in bff.browsers:
            await browser.close()
        await server.close()
        await upstream_server.close()


@pytest.fixture
async def link(redis_server: RedisServerProcess) -> AsyncIterator[RedisLink]:
    relay = await RedisLink(redis_server.port).start()
    yield relay
    await relay.aclose()


def refresh_results(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("tokengate_refresh_total", {"result": result})
    return value or 0.0


async def timed_get(bff: Bff, browser: Any, path: str = "/api/items") -> tuple[int, float]:
    started = time.perf_counter()
    status, _ = await bff.api(browser, path)
    return status, time.perf_counter() - started


async def until(condition: Any, timeout_s: float) -> None:
    """Poll a condition held by another process (the IdP, Redis), bounded by a deadline."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# -- item 3: a slow IdP does not slow requests with valid tokens --------------------------


async def test_a_slow_idp_does_not_slow_requests_whose_token_is_valid(
    idp: OidcProviderProcess, redis_server: RedisServerProcess
) -> None:
    async with bff_on(idp, redis_server.url, refresh={"timeout_s": 8}) as bff:
        browser = bff.browser()
        await bff.login(browser)
        handle = handle_of(bff, browser)
        old = await set_expiry(bff, handle, time.time() + 4)  # inside refresh.ahead_s (5)
        await bff.idp.reset()
        await bff.idp.set_token_behaviour(delay_ms=5000, grant_type="refresh_token", times=1)
        timings = [await timed_get(bff, browser) for _ in range(10)]
        timings += await asyncio.gather(*(timed_get(bff, browser) for _ in range(20)))
        assert [status for status, _ in timings] == [200] * 30
        latencies = sorted(elapsed for _, elapsed in timings)
        print(
            f"\nIdP 5 s slow, token valid: p50={statistics.median(latencies) * 1000:.1f}ms "
            f"max={latencies[-1] * 1000:.1f}ms"
        )
        assert latencies[-1] < 1.0
        assert (await bff.idp.stats())["token_requests"] == 1  # one refresh, under way
        await until(lambda: _grants_are(bff, 1), timeout_s=8)
        stored = await bff.app[STORE].load(handle)
        assert stored is not None
        assert stored.access_token != old.access_token


async def _grants_are(bff: Bff, count: int) -> bool:
    return await refresh_grants(bff) == count


# -- item 2: an orphaned lock does not freeze a session -----------------------------------


async def test_a_lock_left_by_a_dead_replica_does_not_hold_up_a_valid_token(
    bff: Bff, redis_server: RedisServerProcess
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    handle = handle_of(bff, browser)
    await set_expiry(bff, handle, time.time() + 4)  # valid, inside refresh.ahead_s (5)
    # What a replica killed while holding the lock leaves behind: its token, a long TTL.
    raw = Redis.from_url(redis_server.url)
    lock_key = f"{bff.settings.session.key_prefix}:{{{handle.storage_id}}}:lock"
    assert await raw.set(lock_key, "dead-replica", px=20_000, nx=True)
    await bff.idp.reset()
    try:
        timings = await asyncio.gather(*(timed_get(bff, browser) for _ in range(20)))
    finally:
        await raw.delete(lock_key)
        await raw.aclose()
    assert [status for status, _ in timings] == [200] * 20
    assert max(elapsed for _, elapsed in timings) < 0.5
    assert await refresh_grants(bff) == 0  # nobody took the lock


# -- item 4: back off from a failing IdP ---------------------------------------------------


@pytest.fixture
def two_replicas(bff: Bff, redis_server: RedisServerProcess) -> Any:
    upstream_url = str(bff.settings.routes[0].upstream)
    started: list[GatewayProcess] = []
    try:
        for _ in range(2):
            config = replica_config(bff, redis_server.url, upstream_url)
            started.append(GatewayProcess(config).start())
        yield started
    finally:
        for process in started:
            process.stop()


async def test_a_failing_idp_is_asked_no_more_often_than_the_backoff_allows(
    bff: Bff, two_replicas: list[GatewayProcess]
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    await set_expiry(bff, handle_of(bff, browser), time.time() - 1)
    await bff.idp.reset()
    await bff.idp.set_token_behaviour(status=503, grant_type="refresh_token")
    urls = [bff.url] + [replica.url for replica in two_replicas]
    cookie = next(c for c in browser.cookie_jar if c.key == bff.settings.session.cookie_name)
    headers = {"Cookie": f"{cookie.key}={cookie.value}", "X-CSRF": "1"}
    answers: list[tuple[int, str | None]] = []
    started = time.monotonic()
    n = 0
    # Three replicas, a request every 20 ms each, for 6 s: 900 requests that want a refresh.
    while time.monotonic() - started < 6.0:
        async with browser.get(urls[n % 3] + "/api/items", headers=headers) as resp:
            answers.append((resp.status, resp.headers.get("Retry-After")))
        n += 1
        await asyncio.sleep(0.02 / 3)
    attempts = (await bff.idp.stats())["injected"]["status"]
    print(f"\nIdP down 6 s, {len(answers)} requests over 3 replicas: {attempts} refresh attempts")
    # 1 s doubling, each jittered to 50-100 %: attempts at 0, <=1, <=3 s, and at most one
    # more by 6 s (0, 0.5, 1.5, 3.5 at the shortest). Without backoff: one per request.
    assert 3 <= attempts <= 4
    assert {status for status, _ in answers} == {503}
    # Retry-After: what is left of the backoff, up to the 4-8 s after a fourth failure.
    assert {int(after) for _, after in answers if after} <= set(range(1, 9))


# -- item 1: a rotated refresh token is never dropped ---------------------------------------


async def test_a_token_rotated_while_redis_is_away_is_saved_late_and_the_grant_lives(
    idp: OidcProviderProcess, link: RedisLink
) -> None:
    async with bff_on(idp, link.url, session={"local_cache_s": 0}) as bff:
        browser = bff.browser()
        await bff.login(browser)
        handle = handle_of(bff, browser)
        stale = await set_expiry(bff, handle, time.time() - 1)
        await bff.idp.reset()
        await bff.idp.set_token_behaviour(delay_ms=1000, grant_type="refresh_token", times=1)
        request = asyncio.ensure_future(bff.api(browser, "/api/items"))
        await until(_token_requested(bff), timeout_s=5)
        link.cut()  # the IdP is rotating the token; Redis goes away (a failover)
        status, _ = await request
        assert status == 200  # served with the rotated token, not yet stored
        metrics = bff.app[METRICS]
        assert metrics.registry.get_sample_value("tokengate_refresh_saves_pending") == 1
        await asyncio.sleep(1.5)  # the failover's length: the link stays cut
        link.restore()
        await bff.app[STORE].wait_for_unlock(handle, 6)  # the late write let the lock go
        assert refresh_results(metrics, "saved_late") == 1
        assert refresh_results(metrics, "save_lost") == 0
        stored = await bff.app[STORE].load(handle)
        assert stored is not None
        assert stored.refresh_token != stale.refresh_token
        # The grant is alive: the next refresh presents the rotated token and succeeds.
        await set_expiry(bff, handle, time.time() - 1)
        status, _ = await bff.api(browser, "/api/items")
        assert status == 200
        assert await refresh_grants(bff) == 2


def _token_requested(bff: Bff) -> Any:
    async def requested() -> bool:
        return bool((await bff.idp.stats())["token_requests"])

    return requested


# -- item 5: Redis timeouts mean what they say ----------------------------------------------


async def test_redis_unreachable_answers_503_within_redis_timeout(
    idp: OidcProviderProcess, link: RedisLink
) -> None:
    timeout_s = 1.0
    session = {"redis_timeout_s": timeout_s, "local_cache_s": 0}
    async with bff_on(idp, link.url, session=session) as bff:
        browser = bff.browser()
        await bff.login(browser)
        await set_expiry(bff, handle_of(bff, browser), time.time() + 3)  # refresh wanted too
        link.silence()  # a partition: connections open, nothing answers
        started = time.perf_counter()
        status, body = await bff.api(browser, "/api/items")
        elapsed = time.perf_counter() - started
        print(f"\nRedis silent, redis_timeout_s {timeout_s}: 503 after {elapsed:.2f}s")
        assert (status, body["error"]) == (503, "session_store_unavailable")
        assert timeout_s * 0.9 <= elapsed < timeout_s + 0.5
        link.cut()  # a master gone: refused at once
        started = time.perf_counter()
        status, _ = await bff.api(browser, "/api/items")
        assert status == 503
        assert time.perf_counter() - started < timeout_s + 0.5


# -- WAIT: a refresh's writes on a replica before the next step -----------------------------


@pytest.fixture
def replicated_redis() -> Any:
    master = RedisServerProcess().start()
    replica = RedisServerProcess(args=("--replicaof", "127.0.0.1", str(master.port))).start()
    try:
        yield master, replica
    finally:
        replica.stop()
        master.stop()


async def test_wait_replicas_puts_the_lock_and_the_refreshed_session_on_the_replica(
    replicated_redis: tuple[RedisServerProcess, RedisServerProcess],
) -> None:
    master, replica = replicated_redis
    on_replica = Redis.from_url(replica.url)

    async def linked() -> bool:
        info = await on_replica.info("replication")
        return info.get("master_link_status") == "up"

    await until(linked, timeout_s=10)
    settings = SessionSettings(
        redis_url=master.url, key_prefix="w", wait_replicas=1, wait_timeout_s=0.3
    )
    metrics = Metrics()
    store = RedisSessionStore(settings, build_redis(settings), metrics)
    handle = derive_handle(b"w" * 32)
    try:
        created = await store.create(
            handle, Session(subject="alice", access_token="a0", access_expires_at=time.time())
        )
        assert await store.acquire_lock(handle, "token-1", 10)
        # No wait here: WAIT returned once the replica had the write.
        assert await on_replica.get(f"w:{{{handle.storage_id}}}:lock") == b"token-1"
        saved = await store.save(handle, created)
        assert saved is not None
        assert await on_replica.hget(f"w:{{{handle.storage_id}}}:s", "v") == b"2"
        assert not await store.acquire_lock(handle, "token-2", 10)  # taken: no WAIT counted
        assert await store.release_lock(handle, "token-1")
        unreplicated = "tokengate_session_store_unreplicated_total"
        assert metrics.registry.get_sample_value(unreplicated, {"write": "lock"}) is None
        replica.kill()  # the replica gone: the lock is taken all the same, and counted
        started = time.perf_counter()
        assert await store.acquire_lock(handle, "token-3", 10)
        assert 0.25 < time.perf_counter() - started < 1.0
        assert metrics.registry.get_sample_value(unreplicated, {"write": "lock"}) == 1
    finally:
        await store.aclose()
        await on_replica.aclose()


async def test_wait_replicas_on_a_cluster_waits_at_the_node_of_the_session() -> None:
    # redis-py sends WAIT to every primary unless told otherwise; it must go to the node
    # that took the write, on the same connection, and count that node's replica only.
    with ClusterTopology() as cluster:
        settings = SessionSettings(redis_url=cluster.url, wait_replicas=1, wait_timeout_s=0.5)
        metrics = Metrics()
        store = RedisSessionStore(settings, build_redis(settings), metrics)
        handle = derive_handle(b"c" * 32)
        try:
            created = await store.create(
                handle, Session(subject="alice", access_token="a0", access_expires_at=time.time())
            )
            assert await store.acquire_lock(handle, "token-1", 10)
            assert await store.save(handle, created) is not None
            # Both acknowledged by the replica: a WAIT that timed out would be counted here
            # (no wall-clock bound: the first command also sets up the cluster client, which
            # took 0.9 s once on a loaded CI-sized machine).
            unreplicated = "tokengate_session_store_unreplicated_total"
            assert metrics.registry.get_sample_value(unreplicated, {"write": "lock"}) is None
            assert metrics.registry.get_sample_value(unreplicated, {"write": "session"}) is None
            assert await wait_calls_by_node(cluster) == [2]  # one node: the session's
        finally:
            await store.aclose()


async def wait_calls_by_node(cluster: ClusterTopology) -> list[int]:
    """How many WAITs each node that ran any has run (``INFO commandstats``)."""
    calls = []
    for node in cluster.nodes:
        async with Redis(port=node.port) as client:
            stats = await client.info("commandstats")
        if "cmdstat_wait" in stats:
            calls.append(int(stats["cmdstat_wait"]["calls"]))
    return calls
