"""The gateway in front of an upstream that speaks HTTP/1.1 byte for byte.

Every way a response can be framed or broken, seen by the client of the gateway, through
both upstream clients (our HTTP/1.1 pool and aiohttp's): what arrives, which status a
failure becomes, and whether the upstream connection is reused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.settings import parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.raw_http import (
    MALFORMED_RESPONSES,
    SWITCHING_PROTOCOLS,
    RawConn,
    RawServer,
    Script,
    raw_servers,
    respond_forever,
)

Gateway = TestClient[Any, Any]
Front = Callable[[Script], Awaitable[tuple[Gateway, RawServer]]]


@pytest.fixture(params=["http1", "aiohttp"])
async def front(
    request: pytest.FixtureRequest, aiohttp_client: Any, issuer: FakeIssuer
) -> AsyncIterator[Front]:
    """Start a raw upstream with a script and a gateway in front of it (route ``/public``)."""
    async with raw_servers() as start:

        async def build(script: Script) -> tuple[Gateway, RawServer]:
            server = await start(script)
            config = base_config(
                issuer.url,
                f"http://127.0.0.1:{server.port}",
                upstream={"client": request.param},
            )
            return await aiohttp_client(build_app(parse_settings(config))), server

        yield build


def answer_once(response: bytes) -> Script:
    """Answer the first request with these bytes, then close the connection."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response)
        await conn.close()

    return script


async def test_chunked_response_with_trailers_is_relayed_and_reused(front: Front) -> None:
    gateway, server = await front(
        respond_forever(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
        )
    )
    for _ in range(3):
        resp = await gateway.get("/public/x")
        assert resp.status == 200
        assert await resp.read() == b"hello world"
        assert "Trailer" not in resp.headers  # hop-by-hop
    assert server.connections == 1


async def test_head_response_keeps_its_length_and_sends_no_body(
    front: Front, request: pytest.FixtureRequest
) -> None:
    gateway, server = await front(
        respond_forever(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    )
    for _ in range(2):
        resp = await gateway.head("/public/x")
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "100000"
        assert await resp.read() == b""
    assert (await gateway.head("/public/x")).status == 200
    # Our client does not reuse a connection whose HEAD reply announced a body (it may
    # come anyway, as someone else's response); aiohttp's client keeps it.
    http1 = request.node.callspec.params["front"] == "http1"
    assert server.connections == (3 if http1 else 1)
    assert [r.method for r in server.requests] == ["HEAD"] * 3


async def test_no_content_and_not_modified_have_no_body(front: Front) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        await conn.read_request()
        await conn.send(b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\n\r\n')

    gateway, server = await front(script)
    first = await gateway.get("/public/x")
    assert (first.status, await first.read()) == (204, b"")
    second = await gateway.get("/public/x")
    assert (second.status, second.headers["ETag"], await second.read()) == (304, '"a"', b"")
    assert server.connections == 1


async def test_close_delimited_body_is_relayed_whole(front: Front) -> None:
    body = b"x" * 200_000
    gateway, _ = await front(answer_once(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n" + body))
    resp = await gateway.get("/public/x")
    assert resp.status == 200
    assert await resp.read() == body


async def test_an_interim_response_is_skipped(front: Front) -> None:
    gateway, _ = await front(
        respond_forever(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    resp = await gateway.get("/public/x")
    assert (resp.status, await resp.read()) == (200, b"ok")


@pytest.mark.parametrize(
    "response",
    [
        *MALFORMED_RESPONSES,
        b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 70_000 + b"\r\n\r\n",  # a huge head
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd",  # cut short, small: buffered
        b"HTTP/1.1 200 OK\r\nContent-Le",  # cut short in the head
        b"",  # closed before a byte
        SWITCHING_PROTOCOLS,  # to a request that asked for no upgrade
    ],
)
async def test_a_broken_response_is_a_clean_502(front: Front, response: bytes) -> None:
    gateway, _ = await front(answer_once(response))
    resp = await gateway.get("/public/x")
    assert resp.status == 502
    assert (await resp.json())["error"] == "upstream_unavailable"


async def test_a_body_cut_short_after_the_head_aborts_the_client_connection(
    front: Front,
) -> None:
    # The head (and its status) is already sent: the one honest signal left is the abort.
    gateway, _ = await front(
        answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
    )
    resp = await gateway.get("/public/x")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    # The gateway is unharmed.
    assert (await gateway.get("/auth/nothing")).status == 404


async def test_a_kept_alive_connection_closed_by_the_upstream_is_replaced(front: Front) -> None:
    async def answer_then_close(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await conn.close()

    gateway, server = await front(answer_then_close)
    for _ in range(3):
        resp = await gateway.get("/public/x")
        assert (resp.status, await resp.read()) == (200, b"ok")
    assert server.connections == 3


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 2\r\n\r\nok", b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
    ids=["buffered", "streamed"],
)
async def test_a_byte_that_is_not_utf8_cannot_smuggle_our_cookie_name(
    aiohttp_client: Any, issuer: FakeIssuer, client: str, framing: bytes
) -> None:
    # Both clients decode 0xE9 as a lone surrogate, and aiohttp's serialiser drops
    # surrogates: judged as received, the name is not ours; as sent, it is.
    async with raw_servers() as start:
        server = await start(
            respond_forever(
                b"HTTP/1.1 200 OK\r\n"
                b"Set-Cookie: __Host-tokengate\xe9=planted; Path=/\r\n"
                b"Set-Cookie: \xe9__Host-tokengate=planted; Path=/\r\n"
                b"Set-Cookie: theme=dark\xe9\r\n" + framing
            )
        )
        server_url = f"http://127.0.0.1:{server.port}"
        config = base_config(issuer.url, server_url, upstream={"client": client})
        config["oidc"]["client_id"] = "spa"
        config["session"] = {"store": "memory"}
        config["routes"].append({"prefix": "/app", "upstream": server_url, "auth": "session"})
        gateway = await aiohttp_client(build_app(parse_settings(config)))
        resp = await gateway.get("/public/x")
        assert (resp.status, await resp.read()) == (200, b"ok")
        cookies = [v for k, v in resp.raw_headers if k.lower() == b"set-cookie"]
        assert cookies == [b"theme=dark"]
