"""Slow clients, on real sockets against the server ``serve`` builds: each phase a client can
stall in (head, body, reading the response, idle keep-alive) closes its connection within
its timeout and counts it; a client that reads nothing gives up its upstream connection to
a request that needs it; connections beyond the cap are closed on arrival, and the admin
port still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.admin import Readiness
from gateway.http1 import Http1Pool
from gateway.metrics import Metrics
from gateway.server import build_runners
from gateway.settings import parse_settings
from tests.fakes.raw_http import RawConn, RawServer, StartServer, raw_servers
from tests.support.stalling_clients import (
    OK,
    SMALL_RCVBUF,
    Hangups,
    get,
    open_non_reader,
    parse_response,
    read_until_closed,
)

TIMEOUT_S = 0.5
MARGIN_S = 0.5  # a loaded test machine is late; never early
BIG_BYTES = 1 << 30  # a response no test client reads to its end


async def big_or_ok(conn: RawConn) -> None:
    """An upstream answering ``/public/big`` with an endless body, anything else with OK."""
    while (request := await conn.read_request()) is not None:
        if not request.target.startswith("/public/big"):
            await conn.send(OK)
            continue
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BYTES)
        chunk = b"x" * 65536
        while True:  # until the gateway stops reading (send waits) or closes (raises)
            await conn.send(chunk)


@dataclass
class Served:
    port: int
    admin_port: int
    metrics: Metrics

    def timeouts(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tokengate_client_timeouts_total", {"kind": kind}
        )
        return value or 0.0

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


ServeWith = Callable[..., Awaitable[Served]]


@pytest.fixture
async def upstream() -> AsyncIterator[RawServer]:
    async with raw_servers() as start:
        yield await start(big_or_ok)


@pytest.fixture
async def serve(upstream: RawServer) -> AsyncIterator[ServeWith]:
    """Start the public and admin servers with these ``limits`` (and ``upstream`` keys, and
    routes besides ``/public``)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            upstream_settings: dict[str, Any] | None = None,
            routes: tuple[dict[str, Any], ...] = (),
            **limits: Any,
        ) -> Served:
            config = {
                "public_url": "http://localhost:8080",
                "limits": {
                    "shutdown_delay_s": 0,
                    "shutdown_grace_s": 0,
                    "client_header_timeout_s": TIMEOUT_S,
                    "keepalive_timeout_s": TIMEOUT_S,
                    "client_body_timeout_s": TIMEOUT_S,
                    "send_timeout_s": TIMEOUT_S,
                    **limits,
                },
                "upstream": upstream_settings or {},
                "routes": [
                    *routes,
                    {
                        "prefix": "/public",
                        "upstream": f"http://127.0.0.1:{upstream.port}",
                        "auth": "none",
                    },
                ],
            }
            metrics = Metrics()
            runner, admin_runner = build_runners(parse_settings(config), metrics, Readiness())
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await admin_runner.setup()
            stack.push_async_callback(admin_runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            await web.TCPSite(admin_runner, "127.0.0.1", 0).start()
            return Served(runner.addresses[0][1], admin_runner.addresses[0][1], metrics)

        yield start


@pytest.fixture
async def hangups() -> AsyncIterator[Hangups]:
    watch = Hangups()
    yield watch
    watch.close()


def elapsed_since(started: float) -> float:
    return asyncio.get_running_loop().time() - started


def pin_aiohttp_internals() -> None:
    """What ``http_server`` reads from aiohttp's RequestHandler: renamed, it must fail here."""
    for name in ("_waiter", "_current_request", "_request_count", "_keepalive_handle"):
        assert name in web.RequestHandler.__slots__, name
    assert callable(web.RequestHandler._process_keepalive)
    assert callable(web.RequestHandler._drain_helper)


def test_the_aiohttp_internals_the_watchdog_reads_exist() -> None:
    pin_aiohttp_internals()


# -- the head -------------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_timeout_without_a_word(
    serve: ServeWith,
) -> None:
    served = await serve()
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    assert await read_until_closed(reader) == b""
    assert TIMEOUT_S - 0.05 <= elapsed_since(started) <= TIMEOUT_S + MARGIN_S
    assert served.timeouts("head") == 1
    assert served.sample("tokengate_open_connections") == 0
    writer.close()


async def test_a_head_that_stops_midway_is_answered_408_json_and_closed(
    serve: ServeWith, upstream: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    served = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    started = asyncio.get_running_loop().time()
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    status, headers, body = parse_response(await read_until_closed(reader))
    assert TIMEOUT_S - 0.05 <= elapsed_since(started) <= TIMEOUT_S + MARGIN_S
    assert status == 408
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["server"] == "tokengate"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"] == "request_timeout"
    assert served.timeouts("head") == 1
    assert served.sample("tokengate_http_requests_total", route="-", method="other", code="408")
    lines = [r for r in caplog.records if r.getMessage() == "client_timeout"]
    assert [(r.levelno, r.__dict__["timeout"], r.exc_info) for r in lines] == [
        (logging.INFO, "head", None)
    ]
    assert upstream.requests == []
    writer.close()


async def test_a_head_trickled_byte_by_byte_is_closed_at_the_head_timeout_all_the_same(
    serve: ServeWith,
) -> None:
    served = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    started = asyncio.get_running_loop().time()
    closed = asyncio.ensure_future(read_until_closed(reader))
    head = get(b"/public/x")[:-2]  # never the blank line that ends it
    for byte in (head * 100)[:400]:
        if closed.done():
            break
        with contextlib.suppress(ConnectionError):
            writer.write(bytes([byte]))
        await asyncio.wait([closed], timeout=TIMEOUT_S / 10)  # the trickle's pace
    answer = await closed
    assert elapsed_since(started) <= TIMEOUT_S + MARGIN_S
    assert answer == b"" or parse_response(answer)[0] == 408
    assert served.timeouts("head") == 1
    writer.close()


# -- keep-alive -----------------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_at_the_keepalive_timeout(
    serve: ServeWith,
) -> None:
    served = await serve(client_header_timeout_s=30, keepalive_timeout_s=TIMEOUT_S)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(get(b"/public/x"))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(2) == b"ok"
    idle_since = asyncio.get_running_loop().time()
    assert await read_until_closed(reader) == b""
    assert TIMEOUT_S - 0.05 <= elapsed_since(idle_since) <= TIMEOUT_S + MARGIN_S
    assert (served.timeouts("keepalive"), served.timeouts("head")) == (1, 0)
    writer.close()


async def test_the_next_head_is_timed_from_its_first_byte_not_from_the_last_response(
    serve: ServeWith,
) -> None:
    # The head's first byte comes after 2 timeouts; keep-alive would end at 2.4, the head
    # timeout (from that byte) at 3: aiohttp's keep-alive timer must leave it to the latter.
    served = await serve(client_header_timeout_s=TIMEOUT_S, keepalive_timeout_s=2.4 * TIMEOUT_S)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(get(b"/public/x"))
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)
    await asyncio.sleep(2 * TIMEOUT_S)  # idle longer than a head may take, within keep-alive
    first_byte_at = asyncio.get_running_loop().time()
    writer.write(b"GET /public/x HT")
    status, _, _ = parse_response(await read_until_closed(reader))
    assert status == 408
    assert TIMEOUT_S - 0.05 <= elapsed_since(first_byte_at) <= TIMEOUT_S + MARGIN_S
    assert (served.timeouts("head"), served.timeouts("keepalive")) == (1, 0)
    writer.close()


# -- the body -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "sent"),
    [
        (b"Content-Length: 1000", b"x" * 10),
        (b"Transfer-Encoding: chunked", b"a\r\n" + b"x" * 10 + b"\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_a_body_that_stalls_is_a_408_json_and_never_reaches_the_upstream(
    serve: ServeWith, upstream: RawServer, framing: bytes, sent: bytes
) -> None:
    served = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /public/x HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n\r\n" + sent)
    stalled_at = asyncio.get_running_loop().time()
    status, headers, body = parse_response(await read_until_closed(reader))
    assert TIMEOUT_S - 0.05 <= elapsed_since(stalled_at) <= TIMEOUT_S + MARGIN_S
    assert status == 408
    assert headers["connection"] == "close"
    assert "x-request-id" in headers
    assert json.loads(body) == {
        "error": "request_timeout",
        "error_description": "the request was not received in time",
    }
    assert served.timeouts("body") == 1
    assert served.sample("tokengate_http_requests_total", route="public", method="POST", code="408")
    # Bodies up to 64 KiB, chunked ones too, are read before the upstream is asked.
    assert (upstream.connections, upstream.requests) == (0, [])
    writer.close()


async def test_a_body_trickled_within_the_timeout_is_forwarded_whole(
    serve: ServeWith, upstream: RawServer
) -> None:
    served = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(6):  # three timeouts long in all, never silent for one
        writer.write(b"1\r\nx\r\n")
        await asyncio.sleep(TIMEOUT_S / 2)
    writer.write(b"0\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].body == b"x" * 6
    assert upstream.requests[0].header("content-length") == "6"  # sent whole, once complete
    assert served.timeouts("body") == 0
    writer.close()


async def test_a_body_that_stalls_while_its_response_streams_aborts_the_connection(
    serve: ServeWith, raw_upstream: StartServer
) -> None:
    async def answer_at_once(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")  # the head only: the body keeps coming
        # Chunked: relayed as it comes (a length up to 64 KiB would be read whole first).
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nstarted\r\n")
        await conn.reader.read()

    early = await raw_upstream(answer_at_once)
    served = await serve(
        routes=({"prefix": "/early", "upstream": f"http://127.0.0.1:{early.port}", "auth": "none"},)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    # Over 64 KiB declared: streamed to the upstream as it comes.
    writer.write(
        b"POST /early/x HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n" + b"x" * 70000
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    stalled_at = asyncio.get_running_loop().time()
    # Started, so no 408 can follow: the connection breaks before the body's end.
    assert not (await read_until_closed(reader)).endswith(b"0\r\n\r\n")
    assert elapsed_since(stalled_at) <= TIMEOUT_S + MARGIN_S
    assert served.timeouts("body") == 1
    await early.wait_for(lambda: early.closed_connections == 1)
    writer.close()


# -- the response ---------------------------------------------------------------------------


async def test_a_client_that_reads_nothing_is_reset_at_the_send_timeout(
    serve: ServeWith, upstream: RawServer, hangups: Hangups
) -> None:
    served = await serve()
    sock = await open_non_reader(served.port, get(b"/public/big"))
    sent_at = asyncio.get_running_loop().time()
    closed_at = await asyncio.wait_for(hangups.watch(sock), 10)
    assert closed_at - sent_at <= TIMEOUT_S + MARGIN_S
    assert served.timeouts("send") == 1
    # Its upstream connection is closed with it, where the upstream can tell.
    await upstream.wait_for(lambda: upstream.closed_connections == 1)
    sock.close()


async def test_a_slow_reader_that_keeps_reading_is_never_timed_out(
    serve: ServeWith, upstream: RawServer
) -> None:
    served = await serve()
    loop = asyncio.get_running_loop()
    sock = await open_non_reader(served.port, get(b"/public/big"))
    received = 0
    for _ in range(8):  # four send timeouts long, 8 KiB a step
        await asyncio.sleep(TIMEOUT_S / 2)
        for _ in range(2):
            chunk = await loop.sock_recv(sock, SMALL_RCVBUF)
            assert chunk, "the gateway closed a client that was reading"
            received += len(chunk)
    assert served.timeouts("send") == 0
    assert received >= 8 * SMALL_RCVBUF
    sock.close()


# -- the upstream pool ----------------------------------------------------------------------


async def test_four_clients_that_read_nothing_do_not_keep_a_fifth_from_a_pool_of_four(
    serve: ServeWith, upstream: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # The send timeout stays long: only the pool may free a connection here.
    served = await serve({"pool_size": 4}, send_timeout_s=60)
    stalled = [await open_non_reader(served.port, get(b"/public/big")) for _ in range(4)]
    await upstream.wait_for(lambda: len(upstream.requests) == 4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{served.port}/public/x") as response,
    ):
        assert (response.status, await response.read()) == (200, b"ok")
    assert elapsed_since(started) < 5.0  # the stall threshold (2 s), not a 60 s timeout
    # The upstream saw a fifth connection only once one of the four was closed.
    assert upstream.connections == 5
    assert upstream.closed_connections >= 1
    reclaimed = [r for r in caplog.records if r.getMessage() == "upstream_connection_reclaimed"]
    assert len(reclaimed) == 1
    for sock in stalled:
        sock.close()


async def test_a_stalled_reader_keeps_its_connection_while_no_request_waits(
    raw_upstream: StartServer,
) -> None:
    body = b"y" * 300_000

    async def finite(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    server = await raw_upstream(finite)
    async with Http1Pool(limit_per_host=1, reclaim_stalled_after_s=0.1) as pool:
        response = await pool.request(
            "GET", "127.0.0.1", server.port, b"/", [], connect_timeout_s=5, read_timeout_s=5
        )
        chunks = response.iter_chunks()
        received = await anext(chunks)
        await asyncio.sleep(0.3)  # stalled three times the threshold, and no one waits
        async for chunk in chunks:
            received += chunk
        assert received == body


async def test_a_waiting_request_takes_the_connection_of_a_stalled_reader(
    raw_upstream: StartServer,
) -> None:
    server = await raw_upstream(big_or_ok)
    async with Http1Pool(limit_per_host=1, reclaim_stalled_after_s=0.1) as pool:

        async def send(target: bytes) -> Any:
            return await pool.request(
                "GET", "127.0.0.1", server.port, target, [], connect_timeout_s=5, read_timeout_s=5
            )

        stalled = await send(b"/public/big")
        chunks = stalled.iter_chunks()
        await anext(chunks)  # then nothing: the reader stalls
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await (await send(b"/public/x")).read() == b"ok"
        assert elapsed_since(started) < 1.0
        with pytest.raises(ConnectionAbortedError):
            async for _ in chunks:
                pass


# -- the connection cap ---------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_closed_on_arrival_and_the_admin_port_answers(
    serve: ServeWith,
) -> None:
    served = await serve(max_connections=3, client_header_timeout_s=30)
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    assert await read_until_closed(reader) == b""
    writer.close()
    assert served.sample("tokengate_connections_refused_total") == 1
    assert served.sample("tokengate_open_connections") == 3
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{served.admin_port}/healthz") as response,
    ):
        assert response.status == 200
    # The held connections are served as ever.
    held_reader, held_writer = held[0]
    held_writer.write(get(b"/public/x"))
    assert (await held_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    # One closes: its place is free again.
    held[1][1].close()
    for _ in range(100):
        if served.sample("tokengate_open_connections") == 2:
            break
        await asyncio.sleep(0.01)  # the server's side of the close, a loop turn away
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(get(b"/public/x"))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()
    for _, held_writer in held:
        held_writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartServer]:
    async with raw_servers() as start:
        yield start
