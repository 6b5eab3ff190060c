"""Redis timeouts mean what they say: one deadline for a request's store calls.

The Redis here is a loopback listener that accepts connections and never answers (a hung
or partitioned server): each call, redis-py's retry included, fails within
``session.redis_timeout_s``, and calls made under one ``deadline()`` share it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.errors import SessionStoreUnavailableError
from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.deadline import bounded, deadline_of_call, detached
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings

TIMEOUT_S = 0.3
MARGIN_S = 0.15


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """A Redis URL whose server accepts and reads, and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def store(silent_redis: str) -> AsyncIterator[RedisSessionStore]:
    settings = SessionSettings(redis_url=silent_redis, redis_timeout_s=TIMEOUT_S, local_cache_s=0)
    built = RedisSessionStore(settings, build_redis(settings), Metrics())
    yield built
    await built.aclose()


HANDLE = derive_handle(b"h" * 32)


async def test_one_call_with_its_retry_fails_within_the_timeout(store: RedisSessionStore) -> None:
    started = time.monotonic()
    with pytest.raises(SessionStoreUnavailableError):
        await store.load(HANDLE)
    elapsed_s = time.monotonic() - started
    assert TIMEOUT_S * 0.9 <= elapsed_s < TIMEOUT_S + MARGIN_S


async def test_calls_under_one_deadline_share_it(store: RedisSessionStore) -> None:
    started = time.monotonic()
    with store.deadline():
        with pytest.raises(SessionStoreUnavailableError):
            await store.load(HANDLE)
        with pytest.raises(SessionStoreUnavailableError):
            await store.acquire_lock(HANDLE, "token", 10)
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S


async def test_a_task_started_detached_has_no_request_deadline() -> None:
    loop = asyncio.get_running_loop()
    with bounded(5.0):
        inside = deadline_of_call(60.0)
        assert inside <= loop.time() + 5.0
        with bounded(30.0):  # an enclosing, earlier deadline wins
            assert deadline_of_call(60.0) == inside
        inherited = await asyncio.create_task(_deadline_seen())
        alone = await asyncio.create_task(_deadline_seen(), context=detached())
    assert inherited == inside
    assert alone > loop.time() + 59.0
    assert deadline_of_call(60.0) > loop.time() + 59.0  # gone with the block


async def _deadline_seen() -> float:
    return deadline_of_call(60.0)
