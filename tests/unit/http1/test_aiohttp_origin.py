"""The same client against a real aiohttp server: the framings it emits, and reuse counted
by the peer ports the server saw."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.http1 import Http1Pool, Http1Response

AiohttpServer = Callable[..., Awaitable[TestServer]]


class Origin:
    def __init__(self) -> None:
        self.peers: list[int] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/echo", self.echo)
        self.app.router.add_get("/chunked", self.chunked)
        self.app.router.add_get("/status/{code}", self.status)
        self.app.router.add_get("/close", self.close)

    def seen(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer[1] if peer else -1)

    async def echo(self, request: web.Request) -> web.Response:
        self.seen(request)
        body = await request.read()
        return web.Response(
            body=request.method.encode() + b" " + body,
            headers={"X-Got-Expect": request.headers.get("Expect", "-")},
        )

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self.seen(request)
        response = web.StreamResponse(headers={"X-Unicode": "caf\u00e9"})
        await response.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    async def status(self, request: web.Request) -> web.Response:
        self.seen(request)
        return web.Response(status=int(request.match_info["code"]), headers={"ETag": '"v1"'})

    async def close(self, request: web.Request) -> web.Response:
        self.seen(request)
        response = web.Response(text="bye")
        response.force_close()
        return response


@pytest.fixture
async def origin(aiohttp_server: AiohttpServer) -> tuple[Origin, int]:
    origin = Origin()
    server = await aiohttp_server(origin.app, host="127.0.0.1")
    assert server.port is not None
    return origin, server.port


async def send(
    pool: Http1Pool,
    port: int,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
) -> Http1Response:
    return await pool.request(
        method,
        "127.0.0.1",
        port,
        target,
        headers or [],
        body,
        connect_timeout_s=5,
        read_timeout_s=5,
    )


async def test_requests_in_sequence_share_one_connection(
    pool: Http1Pool, origin: tuple[Origin, int]
) -> None:
    fake, port = origin
    for i in range(10):
        resp = await send(pool, port, "POST", b"/echo", body=b"%d" % i)
        assert await resp.read() == b"POST %d" % i
    assert len(fake.peers) == 10
    assert len(set(fake.peers)) == 1


async def test_chunked_responses_and_non_ascii_headers_come_through(
    pool: Http1Pool, origin: tuple[Origin, int]
) -> None:
    _, port = origin
    resp = await send(pool, port, "GET", b"/chunked")
    assert resp.content_length is None
    assert ("X-Unicode", "caf\u00e9") in resp.headers
    assert await resp.read() == b"one two three"


async def test_no_content_and_not_modified_keep_the_connection_head_with_a_length_does_not(
    pool: Http1Pool, origin: tuple[Origin, int]
) -> None:
    fake, port = origin
    head = await send(pool, port, "HEAD", b"/echo")
    assert head.content_length == len(b"HEAD ")
    assert await head.read() == b""
    for code in (204, 304):
        resp = await send(pool, port, "GET", b"/status/%d" % code)
        assert resp.status == code
        assert await resp.read() == b""
    assert await (await send(pool, port, "GET", b"/echo")).read() == b"GET "
    assert len(set(fake.peers)) == 2  # the HEAD's announced body ended its connection


async def test_expect_100_continue_is_answered_and_skipped(
    pool: Http1Pool, origin: tuple[Origin, int]
) -> None:
    _, port = origin
    resp = await send(pool, port, "PUT", b"/echo", [(b"Expect", b"100-continue")], b"payload")
    assert resp.status == 200
    assert ("X-Got-Expect", "100-continue") in resp.headers
    assert await resp.read() == b"PUT payload"


async def test_a_forced_close_is_not_reused(pool: Http1Pool, origin: tuple[Origin, int]) -> None:
    fake, port = origin
    for _ in range(2):
        assert await (await send(pool, port, "GET", b"/close")).read() == b"bye"
    assert len(set(fake.peers)) == 2
