"""Refresh under a lock, against the real oidc-provider (rotating refresh tokens) and a real
redis-server: exactly one refresh grant per expiry, counted at the IdP.

An "expired" session is made by rewriting its stored access-token expiry into the past:
the IdP does not care when our copy expires, and no test waits for a clock to run out.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import statistics
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import STORE
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session, SessionHandle
from tests.fakes.upstream import FakeUpstream
from tests.integration.conftest import Bff, bff_config, free_port, start_bff
from tests.support.gateway_process import GatewayProcess
from tests.support.idp import CLIENT_SECRET, OidcProviderProcess
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration


def handle_of(bff: Bff, browser: aiohttp.ClientSession) -> SessionHandle:
    for cookie in browser.cookie_jar:
        if cookie.key == bff.settings.session.cookie_name and cookie.value:
            secret = parse_secret(cookie.value)
            assert secret is not None
            return derive_handle(secret)
    raise AssertionError("no session cookie")


def cookie_header(bff: Bff, browser: aiohttp.ClientSession) -> str:
    for cookie in browser.cookie_jar:
        if cookie.key == bff.settings.session.cookie_name:
            return f"{cookie.key}={cookie.value}"
    raise AssertionError("no session cookie")


async def set_expiry(bff: Bff, handle: SessionHandle, expires_at: float) -> Session:
    store = bff.app[STORE]
    session = await store.load(handle)
    assert session is not None
    saved = await store.save(handle, dataclasses.replace(session, access_expires_at=expires_at))
    assert saved is not None
    return saved


async def refresh_grants(bff: Bff) -> int:
    stats = await bff.idp.stats()
    return int(stats["grants"].get("refresh_token", 0))


async def test_200_concurrent_requests_on_an_expired_session_refresh_once(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    handle = handle_of(bff, browser)
    stale = await set_expiry(bff, handle, time.time() - 1)
    await bff.idp.reset()

    async def call() -> tuple[int, float]:
        started = time.perf_counter()
        status, _ = await bff.api(browser, "/api/items")
        return status, time.perf_counter() - started

    results = await asyncio.gather(*(call() for _ in range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert await refresh_grants(bff) == 1
    tokens = {seen.headers["Authorization"] for seen in bff.upstream.seen}
    assert len(tokens) == 1
    assert tokens != {f"Bearer {stale.access_token}"}
    latencies = sorted(elapsed for _, elapsed in results)
    print(
        f"\n200 concurrent: refreshes=1 p50={statistics.median(latencies) * 1000:.1f}ms "
        f"p99={latencies[197] * 1000:.1f}ms"
    )


async def test_fifty_sessions_expiring_at_once_refresh_fifty_times(bff: Bff) -> None:
    browsers = [bff.browser() for _ in range(50)]
    for browser in browsers:
        await bff.login(browser)
    for browser in browsers:
        await set_expiry(bff, handle_of(bff, browser), time.time() - 1)
    await bff.idp.reset()
    calls = [bff.api(browser, "/api/items") for browser in browsers for _ in range(4)]
    results = await asyncio.gather(*calls)
    assert [status for status, _ in results] == [200] * 200
    assert await refresh_grants(bff) == 50


async def test_client_that_disconnects_while_the_idp_is_slow_loses_nothing(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    handle = handle_of(bff, browser)
    await set_expiry(bff, handle, time.time() - 1)
    await bff.idp.reset()
    await bff.idp.set_token_behaviour(delay_ms=800, grant_type="refresh_token", times=1)
    with pytest.raises(TimeoutError):
        await bff.api(browser, "/api/items", timeout=aiohttp.ClientTimeout(total=0.2))
    # The flight goes on without the client; this request joins it or finds its result.
    status, _ = await bff.api(browser, "/api/items")
    assert status == 200
    assert await refresh_grants(bff) == 1
    session = await bff.app[STORE].load(handle)
    assert session is not None
    assert session.access_expires_at > time.time()


async def test_idp_failure_keeps_serving_a_valid_token_then_503_then_recovers(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    handle = handle_of(bff, browser)
    await bff.idp.set_token_behaviour(status=503, grant_type="refresh_token")
    # Inside refresh.ahead_s but not expired: the refresh fails, the request still flows.
    await set_expiry(bff, handle, time.time() + 3)
    status, _ = await bff.api(browser, "/api/items")
    assert status == 200  # at once: the refresh runs, and fails, in the background
    async with asyncio.timeout(5):
        while not (await bff.idp.stats())["injected"]["status"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    await bff.app[STORE].wait_for_unlock(handle, 5)  # that refresh is over
    await set_expiry(bff, handle, time.time() - 1)
    async with browser.get(f"{bff.url}/api/items", headers={"X-CSRF": "1"}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"  # what is left of the first backoff
        assert (await resp.json())["error"] == "refresh_unavailable"
    await bff.idp.set_token_behaviour()  # the IdP is back
    await bff.idp.reset()
    bff.clock.advance(1)  # the client came back after Retry-After
    status, _ = await bff.api(browser, "/api/items")
    assert status == 200
    assert await refresh_grants(bff) == 1


async def test_revoked_refresh_token_ends_the_session(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    handle = handle_of(bff, browser)
    session = await bff.app[STORE].load(handle)
    assert session is not None
    assert session.refresh_token is not None
    basic = base64.b64encode(f"tokengate:{CLIENT_SECRET}".encode()).decode()
    async with aiohttp.ClientSession() as http:
        async with http.get(bff.idp.discovery_url) as resp:
            revocation = (await resp.json())["revocation_endpoint"]
        async with http.post(
            revocation,
            data={"token": session.refresh_token, "token_type_hint": "refresh_token"},
            headers={"Authorization": f"Basic {basic}"},
        ) as resp:
            assert resp.status == 200
    await set_expiry(bff, handle, time.time() - 1)
    status, body = await bff.api(browser, "/api/items")
    assert status == 401
    assert body["error"] == "session_expired"
    assert body["login_url"].endswith("/auth/login")
    assert await bff.app[STORE].load(handle) is None


async def test_upstream_401_refreshes_once_and_replays_an_idempotent_request_once(
    bff: Bff,
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    session = await bff.app[STORE].load(handle_of(bff, browser))
    assert session is not None
    bff.upstream.rejected_tokens.add(session.access_token)
    await bff.idp.reset()
    status, _ = await bff.api(browser, "/api/items", method="PUT", json={"a": 1})
    assert status == 200
    assert await refresh_grants(bff) == 1
    assert [
        s.headers["Authorization"] == f"Bearer {session.access_token}" for s in bff.upstream.seen
    ] == [True, False]
    assert bff.upstream.seen[1].body_bytes == bff.upstream.seen[0].body_bytes > 0


async def test_a_post_refused_with_401_gets_a_new_token_but_is_not_replayed(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    session = await bff.app[STORE].load(handle_of(bff, browser))
    assert session is not None
    bff.upstream.rejected_tokens.add(session.access_token)
    await bff.idp.reset()
    status, _ = await bff.api(browser, "/api/items", method="POST", json={"a": 1})
    assert status == 401  # the upstream's own answer
    assert await refresh_grants(bff) == 1
    assert [(s.method, s.headers["Authorization"]) for s in bff.upstream.seen] == [
        ("POST", f"Bearer {session.access_token}")
    ]
    # The client's retry is its own decision, and it carries the new token.
    status, _ = await bff.api(browser, "/api/items", method="POST", json={"a": 1})
    assert status == 200
    assert bff.upstream.seen[-1].headers["Authorization"] != f"Bearer {session.access_token}"
    assert await refresh_grants(bff) == 1


def tokens_seen(bff: Bff, method: str) -> Counter[str]:
    return Counter(s.headers["Authorization"] for s in bff.upstream.seen if s.method == method)


async def test_an_upstream_refusing_every_token_costs_one_refresh_grant_per_window(
    bff: Bff,
) -> None:
    # The red team's endpoint: 401 to every token. Within refresh.forced_min_interval_s
    # (30 s) of the refresh an upstream 401 caused, further 401s are relayed as they are.
    browser = bff.browser()
    await bff.login(browser)
    session = await bff.app[STORE].load(handle_of(bff, browser))
    assert session is not None
    login_token = f"Bearer {session.access_token}"
    bff.upstream.reject_every_token = True
    await bff.idp.reset()
    started = time.monotonic()

    concurrent = await asyncio.gather(*(bff.api(browser, "/api/items") for _ in range(30)))
    assert [status for status, _ in concurrent] == [401] * 30
    assert await refresh_grants(bff) == 1
    seen = tokens_seen(bff, "GET")
    assert seen.pop(login_token) == 30
    assert list(seen.values()) == [30]  # each GET replayed once, all with the one new token

    for _ in range(30):
        status, _ = await bff.api(browser, "/api/items")
        assert status == 401
    assert await refresh_grants(bff) == 1
    assert sum(tokens_seen(bff, "GET").values()) == 90  # no replay: nothing new to send

    posts = [bff.api(browser, "/api/items", method="POST", json={"n": n}) for n in range(30)]
    assert [status for status, _ in await asyncio.gather(*posts)] == [401] * 30
    for n in range(30):
        status, _ = await bff.api(browser, "/api/items", method="POST", json={"n": n})
        assert status == 401
    assert sum(tokens_seen(bff, "POST").values()) == 60  # each POST reached it once
    assert await refresh_grants(bff) == 1
    assert time.monotonic() - started < bff.settings.refresh.forced_min_interval_s


async def test_a_route_may_let_its_posts_be_replayed_after_a_refresh(
    idp: OidcProviderProcess, redis_server: RedisServerProcess
) -> None:
    upstream = FakeUpstream()
    upstream_server = TestServer(upstream.web_app(), host="127.0.0.1")
    await upstream_server.start_server()
    route = {
        "prefix": "/api",
        "upstream": str(upstream_server.make_url("")).rstrip("/"),
        "auth": "session",
        "replay_non_idempotent_after_refresh": True,
    }
    bff, server, unused_upstream = await start_bff(idp, redis_server.url, routes=[route])
    try:
        browser = bff.browser()
        await bff.login(browser)
        session = await bff.app[STORE].load(handle_of(bff, browser))
        assert session is not None
        upstream.rejected_tokens.add(session.access_token)
        await bff.idp.reset()
        status, _ = await bff.api(browser, "/api/items", method="POST", json={"a": 1})
        assert status == 200
        assert [s.method for s in upstream.seen] == ["POST", "POST"]
        assert await refresh_grants(bff) == 1
    finally:
        for browser in bff.browsers:
            await browser.close()
        for test_server in (server, unused_upstream, upstream_server):
            await test_server.close()


async def test_dead_lock_holder_is_outlived_by_the_lock_ttl(bff: Bff) -> None:
    browser = bff.browser()
    await bff.login(browser)
    handle = handle_of(bff, browser)
    await set_expiry(bff, handle, time.time() - 1)
    # A replica that died holding the lock: its token stays until the TTL frees it.
    ttl_s = 1.5
    assert await bff.app[STORE].acquire_lock(handle, "dead-replica", ttl_s)
    await bff.idp.reset()
    started = time.monotonic()
    status, _ = await bff.api(browser, "/api/items")
    assert status == 200
    assert time.monotonic() - started >= ttl_s * 0.9
    assert await refresh_grants(bff) == 1


async def until_idp_counts_a_token_request(bff: Bff, timeout_s: float = 5.0) -> None:
    """Poll the IdP's counter (a condition in another process), bounded by a deadline."""
    async with asyncio.timeout(timeout_s):
        while not (await bff.idp.stats())["token_requests"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def replica_config(bff: Bff, redis_url: str, upstream_url: str) -> dict[str, Any]:
    port = free_port()
    config = bff_config(port, bff.idp, redis_url, upstream_url)
    config["public_url"] = bff.url  # one site, several replicas behind it
    config["admin"] = {"host": "127.0.0.1", "port": free_port()}
    config["log"] = {"access_log": False}
    return config


@pytest.fixture
def replicas(bff: Bff, redis_server: RedisServerProcess) -> Any:
    upstream_url = str(bff.settings.routes[0].upstream)
    started: list[GatewayProcess] = []
    try:
        for _ in range(3):
            started.append(
                GatewayProcess(replica_config(bff, redis_server.url, upstream_url)).start()
            )
        yield started
    finally:
        for process in started:
            process.stop()


async def test_three_processes_sharing_redis_refresh_once(
    bff: Bff, replicas: list[GatewayProcess]
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    await set_expiry(bff, handle_of(bff, browser), time.time() - 1)
    await bff.idp.reset()
    headers = {"Cookie": cookie_header(bff, browser), "X-CSRF": "1"}
    async with aiohttp.ClientSession() as client:

        async def call(i: int) -> int:
            url = replicas[i % 3].url + "/api/items"
            async with client.get(url, headers=headers) as resp:
                return resp.status

        statuses = await asyncio.gather(*(call(i) for i in range(200)))
    assert statuses == [200] * 200
    assert await refresh_grants(bff) == 1
    assert len({s.headers["Authorization"] for s in bff.upstream.seen}) == 1


async def test_replica_killed_mid_refresh_leaves_a_clean_session_expired(
    bff: Bff, replicas: list[GatewayProcess]
) -> None:
    browser = bff.browser()
    await bff.login(browser)
    await set_expiry(bff, handle_of(bff, browser), time.time() - 1)
    await bff.idp.reset()
    await bff.idp.set_token_behaviour(delay_ms=1500, grant_type="refresh_token", times=1)
    headers = {"Cookie": cookie_header(bff, browser), "X-CSRF": "1"}
    async with aiohttp.ClientSession() as client:
        doomed = asyncio.ensure_future(client.get(replicas[0].url + "/api/items", headers=headers))
        await until_idp_counts_a_token_request(bff)
        replicas[0].kill()  # SIGKILL while holding the lock; the IdP still rotates
        with pytest.raises(aiohttp.ClientError):
            await doomed
        started = time.monotonic()
        async with client.get(replicas[1].url + "/api/items", headers=headers) as resp:
            status, body = resp.status, await resp.json()
    # The survivor waited out the lock (2 * timeout + 2 s), then presented the rotated-away
    # refresh token: the IdP revoked the grant; the user gets a clean 401, not a 500.
    assert time.monotonic() - started > 3.0
    assert status == 401
    assert body["error"] == "session_expired"
