"""The pool: reuse, the one retry after a stale keep-alive, idle expiry, limits and closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.http1 import Http1Pool, Http1Response, PoolClosedError, ServerDisconnectedError
from tests.fakes.raw_http import RawConn, RawServer, StartServer, respond_forever

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def send(
    pool: Http1Pool,
    server: RawServer,
    body: bytes | AsyncIterator[bytes] | None = None,
    *,
    connect_timeout_s: float = 5,
) -> Http1Response:
    return await pool.request(
        "POST",
        "127.0.0.1",
        server.port,
        b"/",
        [],
        body,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=5,
    )


async def answer_then_drop_the_next(conn: RawConn) -> None:
    """The first connection answers once, then closes on the next request without a byte:
    a stale keep-alive. Later connections answer."""
    if conn.index == 0:
        await conn.read_request()
        await conn.send(OK)
        await conn.read_request()
        await conn.close()
    else:
        await respond_forever(OK)(conn)


async def always_drop_after_the_first(conn: RawConn) -> None:
    if conn.index == 0:
        await conn.read_request()
        await conn.send(OK)
    await conn.read_request()
    await conn.close()


async def test_reused_connection_closed_before_answering_is_retried_once_on_a_fresh_one(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(answer_then_drop_the_next)
    assert await (await send(pool, server, b"first")).read() == b"ok"
    assert await (await send(pool, server, b"second")).read() == b"ok"
    assert server.connections == 2
    assert [r.body for r in server.requests] == [b"first", b"second", b"second"]


async def test_the_retry_happens_once_only(pool: Http1Pool, raw_server: StartServer) -> None:
    server = await raw_server(always_drop_after_the_first)
    assert await (await send(pool, server)).read() == b"ok"
    with pytest.raises(ServerDisconnectedError):
        await send(pool, server)
    assert server.connections == 2


async def test_a_fresh_connection_closed_before_answering_is_not_retried(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.close()

    server = await raw_server(script)
    with pytest.raises(ServerDisconnectedError):
        await send(pool, server)
    assert server.connections == 1


async def test_a_streamed_body_is_never_retried(pool: Http1Pool, raw_server: StartServer) -> None:
    server = await raw_server(always_drop_after_the_first)
    assert await (await send(pool, server)).read() == b"ok"

    async def body() -> AsyncIterator[bytes]:
        yield b"once"

    with pytest.raises(ServerDisconnectedError):
        await send(pool, server, body())
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(OK)
        await conn.close()  # keep-alive announced, then closed while idle

    server = await raw_server(script)
    assert await (await send(pool, server)).read() == b"ok"
    await server.wait_for(lambda: server.closed_connections == 1)
    assert await (await send(pool, server)).read() == b"ok"
    assert len(server.requests) == 2


async def test_idle_connections_are_closed_after_the_idle_timeout(
    raw_server: StartServer,
) -> None:
    server = await raw_server(respond_forever(OK))
    async with Http1Pool(idle_timeout_s=0.05) as pool:
        assert await (await send(pool, server)).read() == b"ok"
        await server.wait_for(lambda: server.closed_connections == 1)
        assert await (await send(pool, server)).read() == b"ok"
    assert server.connections == 2


async def test_concurrent_requests_stay_within_the_limit_per_host(
    raw_server: StartServer,
) -> None:
    release = asyncio.Event()

    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await release.wait()
            await conn.send(OK)

    server = await raw_server(script)
    async with Http1Pool(limit_per_host=2) as pool:

        async def one() -> bytes:
            return await (await send(pool, server)).read()

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        await server.wait_for(lambda: len(server.requests) == 2)
        release.set()
        assert await asyncio.gather(*tasks) == [b"ok"] * 5
    assert server.connections == 2
    assert len(server.requests) == 5


async def test_waiting_for_a_free_connection_times_out(raw_server: StartServer) -> None:
    release = asyncio.Event()

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await release.wait()
        await conn.send(OK)

    server = await raw_server(script)
    async with Http1Pool(limit_per_host=1) as pool:
        first = asyncio.create_task(send(pool, server))
        await server.wait_for(lambda: len(server.requests) == 1)
        with pytest.raises(TimeoutError):
            await send(pool, server, connect_timeout_s=0.05)
        release.set()
        assert await (await first).read() == b"ok"
    assert server.connections == 1


async def test_releasing_before_the_body_is_read_closes_the_connection(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    server = await raw_server(script)
    (await send(pool, server)).release()
    await server.wait_for(lambda: server.closed_connections == 1)
    (await send(pool, server)).close()
    assert server.connections == 2


async def test_a_complete_but_unread_body_does_not_prevent_reuse(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(respond_forever(OK))
    for _ in range(3):
        async with await send(pool, server) as resp:
            assert resp.status == 200
    assert server.connections == 1


async def test_a_cancelled_request_closes_its_connection(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()  # and never answer

    server = await raw_server(script)
    task = asyncio.create_task(send(pool, server))
    await server.wait_for(lambda: len(server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await server.wait_for(lambda: server.closed_connections == 1)


async def test_aclose_closes_idle_and_lent_connections(raw_server: StartServer) -> None:
    server = await raw_server(respond_forever(OK))
    pool = Http1Pool()
    idle = await send(pool, server)
    lent = await send(pool, server)  # a second connection, never released
    assert await idle.read() == b"ok"
    assert lent.status == 200
    await pool.aclose()
    await server.wait_for(lambda: server.closed_connections == 2)
    with pytest.raises(PoolClosedError):
        await send(pool, server)


async def test_aclose_fails_a_body_still_being_read(raw_server: StartServer) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    server = await raw_server(script)
    pool = Http1Pool()
    resp = await send(pool, server)
    reading = asyncio.create_task(resp.read())
    await asyncio.sleep(0)  # let it start waiting for the rest
    await pool.aclose()
    with pytest.raises(ConnectionAbortedError):
        await reading
