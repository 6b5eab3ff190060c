"""Response framing, byte for byte: every way an HTTP/1.1 response can end, and what follows."""

from __future__ import annotations

import pytest

from gateway.http1 import (
    Http1Pool,
    Http1Response,
    IncompleteResponseError,
    MalformedResponseError,
)
from tests.fakes.raw_http import (
    MALFORMED_RESPONSES,
    SWITCHING_PROTOCOLS,
    RawConn,
    RawServer,
    StartServer,
    respond_forever,
)


async def send(
    pool: Http1Pool, server: RawServer, method: str = "GET", target: bytes = b"/"
) -> Http1Response:
    return await pool.request(
        method, "127.0.0.1", server.port, target, [], None, connect_timeout_s=5, read_timeout_s=5
    )


async def test_content_length_body_is_read_and_the_connection_reused(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(
        respond_forever(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
    )
    for _ in range(5):
        resp = await send(pool, server)
        assert (resp.status, resp.reason, resp.content_length) == (200, "OK", 5)
        assert ("X-A", "1") in resp.headers
        assert await resp.read() == b"hello"
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_chunked_body_with_extensions_and_trailers_is_decoded_and_reused(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(
        respond_forever(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"5;name=value;flag\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\nX-Two: 2\r\n\r\n"
        )
    )
    for _ in range(2):
        resp = await send(pool, server)
        assert resp.content_length is None
        assert [chunk async for chunk in resp.iter_chunks()] == [b"hello", b" world"]
        assert [name for name, _ in resp.headers] == ["Transfer-Encoding", "Trailer"]
    assert server.connections == 1


async def test_a_response_split_into_single_bytes_is_framed_the_same(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    response = (
        b"HTTP/1.1 200 All Good\r\nX-Long-Header: abcdef\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )

    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            for i in range(len(response)):
                await conn.send(response[i : i + 1])

    server = await raw_server(script)
    for _ in range(2):
        resp = await send(pool, server)
        assert resp.reason == "All Good"
        assert ("X-Long-Header", "abcdef") in resp.headers
        assert await resp.read() == b"abc"
    assert server.connections == 1


async def test_close_delimited_body_is_read_to_eof_and_not_reused(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\nuntil")
        await conn.send(b" the end")
        await conn.close()

    server = await raw_server(script)
    for _ in range(2):
        resp = await send(pool, server)
        assert resp.content_length is None
        assert await resp.read() == b"until the end"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("connection", "reused"), [(b"", False), (b"Connection: keep-alive\r\n", True)]
)
async def test_http10_response_is_reused_only_when_it_asks_for_keep_alive(
    pool: Http1Pool, raw_server: StartServer, connection: bytes, reused: bool
) -> None:
    server = await raw_server(
        respond_forever(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n" + connection + b"\r\nabc")
    )
    for _ in range(2):
        assert await (await send(pool, server)).read() == b"abc"
    assert server.connections == (1 if reused else 2)


async def test_connection_close_from_the_server_is_not_reused(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    # The server leaves the socket open: only the header says not to reuse it.
    server = await raw_server(
        respond_forever(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    )
    for _ in range(2):
        assert await (await send(pool, server)).read() == b"ok"
    assert server.connections == 2


async def test_head_response_has_no_body_and_its_announced_length_ends_the_connection(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.method == "HEAD":
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    server = await raw_server(script)
    resp = await send(pool, server, "HEAD")
    assert resp.content_length == 1000
    assert await resp.read() == b""
    # The body it announced must not come; if a broken server sent it later, it would be
    # read as the next request's response. The GET goes on a new connection.
    assert await (await send(pool, server, "GET")).read() == b"get"
    assert server.connections == 2


async def test_head_response_followed_by_body_bytes_is_not_reused(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(respond_forever(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"))
    assert await (await send(pool, server, "HEAD")).read() == b""
    assert await (await send(pool, server, "HEAD")).read() == b""
    assert server.connections == 2


@pytest.mark.parametrize(
    ("head", "connections"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", 1),
        (b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n', 1),
        # A body announced that must not come: the connection is not trusted with another.
        (b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 50\r\n\r\n', 2),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", 2),
    ],
)
async def test_204_and_304_have_no_body_and_keep_the_connection_unless_one_was_announced(
    pool: Http1Pool, raw_server: StartServer, head: bytes, connections: int
) -> None:
    server = await raw_server(respond_forever(head))
    for _ in range(2):
        resp = await send(pool, server)
        assert await resp.read() == b""
    assert server.connections == connections


async def test_interim_responses_are_skipped_and_end_the_connection(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(
        respond_forever(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    for _ in range(2):
        resp = await send(pool, server)
        assert (resp.status, resp.reason) == (201, "Created")
        assert [name for name, _ in resp.headers] == ["Content-Length"]
        assert await resp.read() == b"ok"
    # After an interim response the framing is the upstream's word alone: not reused.
    assert server.connections == 2


async def test_bytes_past_the_content_length_prevent_reuse(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(
        respond_forever(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    )
    for _ in range(2):
        assert await (await send(pool, server)).read() == b"ok"
    assert server.connections == 2


async def test_bytes_arriving_on_an_idle_connection_prevent_reuse(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await conn.send(b"late")

    server = await raw_server(script)
    assert await (await send(pool, server)).read() == b"ok"
    await server.wait_for(lambda: server.closed_connections == 1)  # we hung up on "late"
    assert await (await send(pool, server)).read() == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
)
async def test_premature_eof_raises_incomplete_response(
    pool: Http1Pool, raw_server: StartServer, partial: bytes
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(partial)
        await conn.close()

    async def read_all() -> None:
        resp = await send(pool, server)
        async for _ in resp.iter_chunks():
            pass

    server = await raw_server(script)
    with pytest.raises(IncompleteResponseError):
        await read_all()
    assert isinstance(IncompleteResponseError(), ConnectionError)


@pytest.mark.parametrize("response", [*MALFORMED_RESPONSES, SWITCHING_PROTOCOLS])
async def test_malformed_or_ambiguous_responses_raise(
    pool: Http1Pool, raw_server: StartServer, response: bytes
) -> None:
    server = await raw_server(respond_forever(response))
    with pytest.raises(MalformedResponseError):
        await send(pool, server)
    await server.wait_for(lambda: server.closed_connections == 1)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 7_000 + b"\r\n",
    ],
)
async def test_a_response_head_over_64_kib_is_refused(
    pool: Http1Pool, raw_server: StartServer, response: bytes
) -> None:
    server = await raw_server(respond_forever(response))
    with pytest.raises(MalformedResponseError, match="too large"):
        await send(pool, server)
