"""Bodies far larger than memory, both ways, against a real aiohttp server; backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.http1 import Http1Pool, connection
from tests.fakes.raw_http import RawConn, StartServer
from tests.support.memory import peak_rss_bytes, reset_peak_rss

AiohttpServer = Callable[..., Awaitable[TestServer]]

BLOCK = bytes(range(256)) * 256  # 64 KiB
BLOCKS = 4096  # 256 MiB
TOTAL_BYTES = len(BLOCK) * BLOCKS
MEMORY_BUDGET_BYTES = 64 * 1024 * 1024


async def download(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    if request.query.get("framing") == "length":
        response.content_length = TOTAL_BYTES
    await response.prepare(request)  # otherwise chunked
    for _ in range(BLOCKS):
        await response.write(BLOCK)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.Response(text=str(received))


async def origin(aiohttp_server: AiohttpServer) -> TestServer:
    app = web.Application()
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_a_256_mib_download_streams_in_flat_memory(
    pool: Http1Pool, aiohttp_server: AiohttpServer
) -> None:
    server = await origin(aiohttp_server)
    for framing in (b"length", b"chunked"):
        reset_peak_rss()
        before = peak_rss_bytes()
        resp = await pool.request(
            "GET",
            "127.0.0.1",
            server.port or 0,
            b"/download?framing=" + framing,
            [],
            None,
            connect_timeout_s=5,
            read_timeout_s=10,
        )
        received = 0
        async for chunk in resp.iter_chunks():
            received += len(chunk)
        assert received == TOTAL_BYTES
        assert peak_rss_bytes() - before < MEMORY_BUDGET_BYTES


async def test_a_256_mib_streamed_upload_runs_in_flat_memory(
    pool: Http1Pool, aiohttp_server: AiohttpServer
) -> None:
    server = await origin(aiohttp_server)

    async def blocks() -> AsyncIterator[bytes]:
        for _ in range(BLOCKS):
            yield BLOCK

    reset_peak_rss()
    before = peak_rss_bytes()
    resp = await pool.request(
        "POST",
        "127.0.0.1",
        server.port or 0,
        b"/upload",
        [],
        blocks(),
        connect_timeout_s=5,
        read_timeout_s=10,
    )
    assert await resp.read() == str(TOTAL_BYTES).encode()
    assert peak_rss_bytes() - before < MEMORY_BUDGET_BYTES


async def test_a_lagging_consumer_stops_the_socket_being_read(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * len(BLOCK)))
        for _ in range(64):  # 4 MiB: more than the buffer we allow, less than loopback's
            await conn.send(BLOCK)

    server = await raw_server(script)
    resp = await pool.request(
        "GET", "127.0.0.1", server.port, b"/", [], None, connect_timeout_s=5, read_timeout_s=5
    )
    # White-box: nothing outside shows that a socket is not being read.
    transport = resp._conn._transport
    assert transport is not None
    async with asyncio.timeout(5):
        while transport.is_reading():  # noqa: ASYNC110 - a transport state has no event
            await asyncio.sleep(0.001)
    # Reading stops once the high-water mark is passed: at most one socket read (uvloop
    # reads up to 256 KiB at a time) beyond it.
    assert resp._conn._buffered_bytes <= connection._HIGH_WATER_BYTES + 256 * 1024
    received = 0
    async for chunk in resp.iter_chunks():
        received += len(chunk)
    assert received == 64 * len(BLOCK)
