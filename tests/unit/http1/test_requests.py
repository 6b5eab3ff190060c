"""Request serialisation as the upstream receives it: head, framing, and refused input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.http1 import Http1Pool, Http1Response, InvalidRequestError
from gateway.http1.wire import build_authority
from tests.fakes.raw_http import RawConn, RawServer, StartServer, respond_forever

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def send(
    pool: Http1Pool,
    server: RawServer,
    method: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | AsyncIterator[bytes] | None,
    target: bytes = b"/p?q=%20",
) -> Http1Response:
    return await pool.request(
        method,
        "127.0.0.1",
        server.port,
        target,
        headers,
        body,
        connect_timeout_s=5,
        read_timeout_s=5,
    )


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_bytes_body_gets_its_own_content_length_after_host(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(respond_forever(OK))
    headers = [(b"X-A", b"1"), (b"Content-Length", b"99"), (b"Transfer-Encoding", b"gzip")]
    assert await (await send(pool, server, "POST", headers, b"abc")).read() == b"ok"
    assert server.requests[0].raw == (
        b"POST /p?q=%%20 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc"
        % server.port
    )


async def test_a_large_bytes_body_is_sent_whole(pool: Http1Pool, raw_server: StartServer) -> None:
    server = await raw_server(respond_forever(OK))
    body = bytes(range(256)) * 4096  # 1 MiB, past the size sent in the head's write
    assert await (await send(pool, server, "PUT", [], body)).read() == b"ok"
    assert server.requests[0].body == body


@pytest.mark.parametrize(("method", "framing"), [("POST", b"Content-Length: 0\r\n"), ("GET", b"")])
async def test_no_body_declares_zero_length_only_where_the_method_expects_content(
    pool: Http1Pool, raw_server: StartServer, method: str, framing: bytes
) -> None:
    server = await raw_server(respond_forever(OK))
    await (await send(pool, server, method, [(b"Host", b"api.example")], None)).read()
    assert server.requests[0].raw == (
        method.encode() + b" /p?q=%20 HTTP/1.1\r\nHost: api.example\r\n" + framing + b"\r\n"
    )


async def test_a_stream_without_length_is_sent_chunked(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(respond_forever(OK))
    resp = await send(pool, server, "POST", [], chunks(b"ab", b"", b"cde" * 10))
    assert await resp.read() == b"ok"
    raw = server.requests[0].raw
    assert b"Transfer-Encoding: chunked\r\n" in raw
    assert raw.endswith(b"\r\n\r\n2\r\nab\r\n1e\r\n" + b"cde" * 10 + b"\r\n0\r\n\r\n")
    assert await (await send(pool, server, "GET", [], None)).read() == b"ok"
    assert server.connections == 1  # reused once the stream and the response both ended


async def test_a_stream_with_a_declared_length_is_sent_as_is(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(respond_forever(OK))
    headers = [(b"content-length", b"5")]
    assert await (await send(pool, server, "PUT", headers, chunks(b"ab", b"cde"))).read() == b"ok"
    raw = server.requests[0].raw
    assert b"Transfer-Encoding" not in raw
    assert raw.endswith(b"Content-Length: 5\r\n\r\nabcde")


async def test_a_stream_longer_than_declared_fails_and_closes(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    server = await raw_server(respond_forever(OK))
    with pytest.raises(InvalidRequestError, match="longer"):
        await send(pool, server, "PUT", [(b"Content-Length", b"2")], chunks(b"ab", b"c"))
    await server.wait_for(lambda: server.closed_connections == 1)


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ([(b"X-Claim", b"a\r\nX-Injected: 1")], b"/"),
        ([(b"X-Claim", b"a\nb")], b"/"),
        ([(b"X-Claim", b"a\rb")], b"/"),
        ([(b"X-Bad\r\nX-Injected", b"1")], b"/"),
        ([(b"X-Nul", b"a\x00b")], b"/"),
        ([], b"/a HTTP/1.1\r\nX: y"),
        ([], b"/a b"),
    ],
)
async def test_header_and_target_injection_is_refused_before_connecting(
    pool: Http1Pool,
    raw_server: StartServer,
    headers: list[tuple[bytes, bytes]],
    target: bytes,
) -> None:
    server = await raw_server(respond_forever(OK))
    with pytest.raises(InvalidRequestError, match="CR, LF"):
        await send(pool, server, "GET", headers, None, target)
    assert server.connections == 0


class BodySourceError(Exception):
    pass


async def test_an_error_from_the_body_stream_reaches_the_caller_as_is(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise BodySourceError

    server = await raw_server(respond_forever(OK))
    with pytest.raises(BodySourceError):
        await send(pool, server, "POST", [], failing())
    await server.wait_for(lambda: server.closed_connections == 1)
    assert server.requests == []  # the chunked body never ended


async def test_an_early_response_during_an_upload_is_returned(
    pool: Http1Pool, raw_server: StartServer
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig"
        )
        conn.writer.write_eof()  # then keeps reading (and dropping) the body: no RST

    async def endless() -> AsyncIterator[bytes]:
        block = b"x" * 65536
        for _ in range(16 * 1024):  # 1 GiB: it must not have to be sent
            yield block

    server = await raw_server(script)
    resp = await send(pool, server, "POST", [], endless())
    assert resp.status == 413
    assert await resp.read() == b"big"
    await server.wait_for(lambda: server.closed_connections == 1)


@pytest.mark.parametrize(
    ("host", "port", "authority"),
    [
        ("127.0.0.1", 8080, b"127.0.0.1:8080"),
        ("api.example", 80, b"api.example"),
        ("::1", 8080, b"[::1]:8080"),
        ("b\u00fccher.example", 8080, b"xn--bcher-kva.example:8080"),
    ],
)
def test_the_default_host_header_is_the_origin_authority(
    host: str, port: int, authority: bytes
) -> None:
    assert build_authority(host, port) == authority
