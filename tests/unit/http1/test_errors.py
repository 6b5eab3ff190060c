"""Failures the caller maps to 502/504: refused, reset, and the two timeouts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from gateway.http1 import (
    Http1Pool,
    Http1Response,
    IncompleteResponseError,
    ServerDisconnectedError,
)
from tests.fakes.raw_http import RawConn, StartServer


async def send(
    pool: Http1Pool, port: int, *, connect_timeout_s: float = 5, read_timeout_s: float = 5
) -> Http1Response:
    return await pool.request(
        "GET",
        "127.0.0.1",
        port,
        b"/",
        [],
        None,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
    )


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def full_backlog_port() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    neither succeeds nor fails until its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_a_refused_connection_raises_connection_refused(
    pool: Http1Pool, closed_port: int
) -> None:
    with pytest.raises(ConnectionRefusedError):
        await send(pool, closed_port)


async def test_a_connect_that_hangs_raises_timeout(pool: Http1Pool, full_backlog_port: int) -> None:
    with pytest.raises(TimeoutError):
        await send(pool, full_backlog_port, connect_timeout_s=0.1)


async def test_silence_before_the_head_raises_timeout_and_closes(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()

    server = await raw_server(script)
    with pytest.raises(TimeoutError):
        await send(pool, server.port, read_timeout_s=0.05)
    await server.wait_for(lambda: server.closed_connections == 1)


async def test_silence_in_the_middle_of_the_body_raises_timeout(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    server = await raw_server(script)
    resp = await send(pool, server.port, read_timeout_s=0.05)
    received = []

    async def read_all() -> None:
        async for chunk in resp.iter_chunks():
            received.append(chunk)

    with pytest.raises(TimeoutError):
        await read_all()
    assert received == [b"abc"]
    await server.wait_for(lambda: server.closed_connections == 1)


def reset(conn: RawConn) -> None:
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.writer.transport.abort()


async def test_a_reset_before_the_response_raises_a_connection_error(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        reset(conn)

    server = await raw_server(script)
    with pytest.raises(ServerDisconnectedError) as caught:
        await send(pool, server.port)
    assert isinstance(caught.value, ConnectionError)


async def test_a_reset_mid_body_raises_incomplete_response(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited, but reset")
        reset(conn)

    async def read_all() -> bytes:
        return await (await send(pool, server.port)).read()

    server = await raw_server(script)
    with pytest.raises(IncompleteResponseError):
        await read_all()


async def test_a_body_that_keeps_coming_outlives_the_read_timeout_of_its_first_wait(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    # The read timeout is silence per wait: a body whose pieces come 0.05 s apart takes
    # longer than the 0.15 s timeout in all, and the timer set by the first wait fires while
    # a later one waits (it must look again, not fail the read).
    pieces = 8

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % pieces)
        for _ in range(pieces):
            await asyncio.sleep(0.05)  # the slow upstream's pace
            await conn.send(b"x")

    server = await raw_server(script)
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await send(pool, server.port, read_timeout_s=0.15)
    body = b"".join([chunk async for chunk in resp.iter_chunks()])
    assert body == b"x" * pieces
    assert loop.time() - started > 0.15 * 2


async def test_a_reused_connection_is_timed_by_the_new_request_s_own_timeout(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    # The first exchange leaves a 30 s timer behind; the second, silent, must fail at its
    # own 0.05 s, not when that timer would have fired.
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await conn.read_request()  # and no answer

    server = await raw_server(script)
    first = await send(pool, server.port, read_timeout_s=30)
    assert await first.read() == b"ok"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await send(pool, server.port, read_timeout_s=0.05)
    assert loop.time() - started < 5
    assert server.connections == 1  # the same connection, reused
