"""A buffered relay's response: the head we write ourselves, next to the one aiohttp writes.

``BufferedResponse`` replaces ``web.Response`` for a relayed body read whole; what reaches
the client must be what aiohttp would have sent (the same fields, Connection decided the
same way), in one write. Unit cases through a real server against ``web.Response`` as the
oracle, generated field sets parsed back with httptools, and hostile upstreams on a raw
socket: a CR, LF or other control character from the upstream never reaches a client.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from aiohttp.test_utils import TestServer, make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import build_app
from gateway.context import open_context
from gateway.errors import UpstreamUnavailableError
from gateway.metrics import Metrics
from gateway.settings import parse_settings
from gateway.upstream import BufferedResponse, Upstream, as_sent
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.raw_http import RawConn, raw_servers
from tests.fakes.upstream import CannedReply

REQUEST_ID = "rid-1"


@dataclass
class Parsed:
    """A response as a client's llhttp reads it."""

    version: str = ""
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def fields(self, *without: bytes) -> list[tuple[bytes, bytes]]:
        """The fields, names lowercased, sorted; those named in ``without`` left out."""
        return sorted((k.lower(), v) for k, v in self.headers if k.lower() not in without)

    def values_of(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


def parse(raw: bytes) -> Parsed:
    parsed = Parsed()
    parser = httptools.HttpResponseParser(parsed)
    parser.feed_data(raw)
    parsed.version = parser.get_http_version()
    parsed.status = parser.get_status_code()
    return parsed


# Against aiohttp's own web.Response, through a real server ---------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    reason: str = "OK"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b'{"ok":true}'


Build = Callable[[web.Request, Reply], web.StreamResponse]


def ours(request: web.Request, reply: Reply) -> web.StreamResponse:
    return BufferedResponse(request, reply.status, reply.reason, [*reply.headers], reply.body)


def aiohttps(request: web.Request, reply: Reply) -> web.StreamResponse:
    return web.Response(
        status=reply.status, reason=reply.reason, headers=[*reply.headers], body=reply.body
    )


async def exchange(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    build: Build,
    reply: Reply,
    request_head: bytes,
    *,
    then: Callable[[web.StreamResponse], None] | None = None,
) -> tuple[bytes, int]:
    """The bytes a client gets for ``request_head`` from a handler answering ``build``'s
    response, set up as ``ingress`` leaves it; and the writer's output_size."""
    sizes: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        open_context(REQUEST_ID)
        response = build(request, reply)
        response.headers["X-Request-Id"] = REQUEST_ID  # as ingress does, before prepare
        if then is not None:
            then(response)
        await response.prepare(request)
        await response.write_eof()
        sizes.append(request.writer.output_size)
        return response

    app = web.Application()
    app.router.add_route("*", "/x", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_head)
    await writer.drain()
    raw = b""
    while not parse(raw).complete:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        raw += chunk
    writer.close()
    return raw, sizes[0]


HEADS = {
    "1.1": b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    "1.1-close": b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "1.0": b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
    "1.0-keep-alive": b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
}
REPLIES = {
    "plain": Reply(),
    "upstream-server-date-type": Reply(
        headers=(
            ("Server", "upstream/1"),
            ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("Content-Type", "application/json"),
            ("X-Request-Id", "the-upstreams"),
        )
    ),
    "empty-body": Reply(status=202, reason="Accepted", body=b""),
    "many-fields": Reply(
        status=404,
        reason="Not Found",
        headers=(
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Cache-Control", "no-store"),
            ("x-lower", "v\twith tab "),
            ("X-Utf8", "café"),
            ("X-Bytes", "caf\udce9"),
        ),
    ),
    "no-reason": Reply(status=299, reason=""),
}


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("reply", REPLIES.values(), ids=REPLIES.keys())
async def test_the_client_gets_what_aiohttp_would_send(
    aiohttp_server: Any, head: bytes, reply: Reply
) -> None:
    raw, size = await exchange(aiohttp_server, ours, reply, head)
    oracle_raw, oracle_size = await exchange(aiohttp_server, aiohttps, reply, head)
    got, oracle = parse(raw), parse(oracle_raw)
    assert (got.version, got.status, got.reason) == (oracle.version, oracle.status, oracle.reason)
    assert got.fields(b"date") == oracle.fields(b"date")
    assert len(got.values_of(b"date")) == 1
    assert got.body == oracle.body == reply.body
    assert got.values_of(b"x-request-id") == [REQUEST_ID.encode()]
    assert size == len(raw)  # output_size counts the head too, as aiohttp's does
    assert size == oracle_size


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
async def test_force_close_before_prepare_closes_as_aiohttps_does(
    aiohttp_server: Any, head: bytes
) -> None:
    def close(response: web.StreamResponse) -> None:
        response.force_close()

    raw, _ = await exchange(aiohttp_server, ours, Reply(), head, then=close)
    oracle_raw, _ = await exchange(aiohttp_server, aiohttps, Reply(), head, then=close)
    assert parse(raw).fields(b"date") == parse(oracle_raw).fields(b"date")


async def test_a_field_set_before_prepare_replaces_the_upstreams_but_not_the_framing(
    aiohttp_server: Any,
) -> None:
    def add(response: web.StreamResponse) -> None:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Length"] = "999"
        response.headers["Connection"] = "upgrade"
        response.set_cookie("c", "3")

    reply = Reply(headers=(("Cache-Control", "public"), ("X-Kept", "1")))
    raw, _ = await exchange(aiohttp_server, ours, reply, HEADS["1.1"], then=add)
    got = parse(raw)
    assert got.values_of(b"cache-control") == [b"no-store"]
    assert got.values_of(b"content-length") == [str(len(reply.body)).encode()]
    assert got.values_of(b"connection") == []
    assert got.values_of(b"x-kept") == [b"1"]
    assert got.values_of(b"set-cookie") == [b"c=3; Path=/"]
    assert got.values_of(b"x-request-id") == [REQUEST_ID.encode()]
    assert got.body == reply.body


# Generated field sets, parsed back ------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
field_names = st.text(TCHARS, min_size=1, max_size=12)
# As llhttp hands values over: no control character but HTAB, no leading whitespace; UTF-8
# text, and bytes that are not UTF-8 as the lone surrogates surrogateescape makes of them.
value_chars = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.just("\t"),
    st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF),
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
)
field_values = st.text(value_chars, max_size=16).filter(lambda v: v[:1] not in (" ", "\t"))
reasons = st.text(value_chars, max_size=12).filter(lambda v: v[:1] not in (" ", "\t"))
field_lists = st.lists(
    st.tuples(
        st.one_of(
            field_names,
            st.sampled_from(["Date", "server", "Content-Type", "X-Request-Id", "Set-Cookie"]),
        ),
        field_values,
    ),
    max_size=10,
)
FRAMING = {b"content-length", b"transfer-encoding", b"connection"}


class Wire:
    """The request's writer: what was written, in how many writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.output_size = 0

    async def write_eof(self, chunk: bytes = b"") -> None:
        self.writes.append(chunk)
        self.output_size += len(chunk)


def mocked_request(version: HttpVersion, keep_alive: bool, wire: Wire) -> web.Request:
    request = make_mocked_request("GET", "/x", version=version, writer=wire)
    request._message = request._message._replace(should_close=not keep_alive)
    return request


def encoded(text: str) -> bytes:
    return as_sent(text).encode()


@given(
    fields=field_lists,
    reason=reasons,
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    body=st.binary(max_size=64),
    version=st.sampled_from([HttpVersion10, HttpVersion11]),
    keep_alive=st.booleans(),
    traced=st.booleans(),
)
def test_the_head_parses_back_to_exactly_the_kept_fields_and_ours(
    fields: list[tuple[str, str]],
    reason: str,
    status: int,
    body: bytes,
    version: HttpVersion,
    keep_alive: bool,
    traced: bool,
) -> None:
    fields = [(k, v) for k, v in fields if k.lower().encode() not in FRAMING]
    wire = Wire()

    async def relay() -> None:
        if traced:
            open_context(REQUEST_ID)
        request = mocked_request(version, keep_alive, wire)
        response = BufferedResponse(request, status, reason, fields, body)
        await response.prepare(request)
        await response.write_eof()
        assert response.keep_alive is keep_alive

    contextvars.copy_context().run(asyncio.run, relay())
    assert len(wire.writes) == 1
    got = parse(wire.writes[0])
    assert got.complete
    assert got.version == f"{version.major}.{version.minor}"
    assert (got.status, got.reason, got.body) == (status, encoded(reason), body)
    names = {k.lower() for k, _ in fields}
    kept = [(k, v) for k, v in fields if not (traced and k.lower() == "x-request-id")]
    expected = [(k.lower().encode(), encoded(v)) for k, v in kept]
    expected.append((b"content-length", str(len(body)).encode()))
    if body and "content-type" not in names:
        expected.append((b"content-type", b"application/octet-stream"))
    if "server" not in names:
        expected.append((b"server", got.values_of(b"server")[-1]))
    if traced:
        expected.append((b"x-request-id", REQUEST_ID.encode()))
    if version == HttpVersion11 and not keep_alive:
        expected.append((b"connection", b"close"))
    if version == HttpVersion10 and keep_alive:
        expected.append((b"connection", b"keep-alive"))
    if "date" in names:
        assert got.fields() == sorted(expected)
    else:
        assert got.fields(b"date") == sorted(expected)
        (date,) = got.values_of(b"date")
        assert re.fullmatch(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", date)


FORBIDDEN = [chr(c) for c in (*range(0x09), *range(0x0A, 0x20), 0x7F)]


@given(
    fields=field_lists,
    reason=reasons,
    where=st.integers(0, 10),
    bad=st.sampled_from(FORBIDDEN),
    at=st.integers(0, 16),
)
def test_a_control_character_anywhere_in_a_field_or_the_reason_is_refused(
    fields: list[tuple[str, str]], reason: str, where: int, bad: str, at: int
) -> None:
    request = mocked_request(HttpVersion11, True, Wire())
    if where >= len(fields):
        reason = reason[:at] + bad + reason[at:]
    else:
        name, value = fields[where]
        fields[where] = (name, value[:at] + bad + value[at:])
    with pytest.raises(ValueError, match=r"CR|LF|control character|cannot contain"):
        BufferedResponse(request, 200, reason, fields, b"x")


# Through relay ------------------------------------------------------------------------------


def relaying_upstream() -> Upstream:
    return Upstream(
        None,  # type: ignore[arg-type]  # relay never uses the ClientSession
        None,
        Metrics(),
        max_body_bytes=1024,
        public_url="https://app.example.com",
        own_cookies=frozenset({"__Host-tokengate"}),
    )


async def test_relay_buffers_a_small_body_and_keeps_the_cookie_guard() -> None:
    reply = CannedReply(
        200,
        "OK",
        [
            ("Set-Cookie", "__Host-tokengate=planted"),
            ("Set-Cookie", "=__Host-tokengate=planted"),
            ("Set-Cookie", "theme=dark"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Content-Length", "5"),
        ],
    )
    wire = Wire()
    request = mocked_request(HttpVersion11, True, wire)
    response = await relaying_upstream().relay(request, reply)
    assert isinstance(response, BufferedResponse)
    assert reply.released
    await response.prepare(request)
    await response.write_eof()
    got = parse(wire.writes[0])
    assert got.values_of(b"set-cookie") == [b"theme=dark"]
    assert not {b"x-hop", b"keep-alive", b"connection"} & {k.lower() for k, _ in got.headers}
    assert got.values_of(b"content-length") == [b"5"]
    assert got.body == b"hello"


@pytest.mark.parametrize(
    ("method", "status", "length"),
    [("HEAD", 200, 5), ("GET", 204, 5), ("GET", 304, 5), ("GET", 200, None), ("GET", 200, 1 << 20)],
)
async def test_what_is_not_a_small_body_of_known_length_is_streamed(
    method: str, status: int, length: int | None
) -> None:
    reply = CannedReply(status, "X", [])
    reply.content_length = length
    request = make_mocked_request(method, "/x")
    response = await relaying_upstream().relay(request, reply)
    assert not isinstance(response, BufferedResponse)
    assert response.prepared


@pytest.mark.parametrize("length", [5, None], ids=["buffered", "streamed"])
@pytest.mark.parametrize(
    ("reason", "headers"),
    [("O\x00K", []), ("OK", [("X-A", "a\x01b")]), ("OK", [("X\x7f", "a")])],
    ids=["reason", "value", "name"],
)
async def test_a_control_character_in_the_head_is_a_502_before_a_byte_is_sent(
    reason: str, headers: list[tuple[str, str]], length: int | None
) -> None:
    reply = CannedReply(200, reason, headers)
    reply.content_length = length
    request = make_mocked_request("GET", "/x")
    with pytest.raises(UpstreamUnavailableError):
        await relaying_upstream().relay(request, reply)
    assert reply.released or reply.closed


async def test_write_is_refused_and_write_eof_writes_once() -> None:
    wire = Wire()
    request = mocked_request(HttpVersion11, True, wire)
    response = BufferedResponse(request, 200, "OK", [], b"body")
    with pytest.raises(RuntimeError):
        await response.write_eof()  # before prepare
    await response.prepare(request)
    assert response.prepared
    with pytest.raises(RuntimeError):
        await response.write(b"more")
    await response.write_eof()
    await response.write_eof()
    assert len(wire.writes) == 1
    assert response.body_length == wire.output_size


# Hostile upstreams, on a raw socket -----------------------------------------------------------

# Heads up to the framing: a field, or the status line's reason phrase, with a control
# character, each alone in an otherwise plain head.
HOSTILE = {
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n",
    "ctl-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\n",
    "del-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n",
    "bare-cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rX-Injected: 1\r\n",
    "bare-lf-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\nX-Injected: 1\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n X-Injected: 1\r\n",
    "nul-in-name": b"HTTP/1.1 200 OK\r\nX-\x00A: a\r\n",
    "space-in-name": b"HTTP/1.1 200 OK\r\nX A: a\r\n",
    "nul-in-reason": b"HTTP/1.1 200 O\x00K\r\n",
    "ctl-in-reason": b"HTTP/1.1 200 O\x01K\r\n",
    "del-in-reason": b"HTTP/1.1 200 O\x7fK\r\n",
    "bare-cr-in-reason": b"HTTP/1.1 200 O\rX-Injected: 1\r\n",
    "bare-lf-in-reason": b"HTTP/1.1 200 O\nX-Injected: 1\r\n",
}
FRAMINGS = {
    "buffered": b"Content-Length: 2\r\n\r\nok",
    "streamed": b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
}


def answer(head: bytes, framing: str) -> Callable[[RawConn], Awaitable[None]]:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(head + FRAMINGS[framing])
        await conn.close()

    return script


async def through_the_gateway(
    aiohttp_client: Any, issuer: FakeIssuer, client: str, script: Any
) -> tuple[int, bytes]:
    """The status and the raw head the client of the gateway gets."""
    async with raw_servers() as start:
        server = await start(script)
        config = base_config(
            issuer.url, f"http://127.0.0.1:{server.port}", upstream={"client": client}
        )
        gateway = await aiohttp_client(build_app(parse_settings(config)))
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return int(raw.split(b" ", 2)[1]), raw.partition(b"\r\n\r\n")[0]


# aiohttp's client parser (not ours) reads a bare LF as a line's end and unfolds obs-fold:
# the upstream's lines as it read them, which we write back well-formed.
AIOHTTP_READS_AS_LINES = {"bare-lf-in-value", "obs-fold", "bare-lf-in-reason"}


def assert_well_formed(status: int, head: bytes, client: str, case: str) -> None:
    """A 502 (never aiohttp's serialiser refusing it: a 500), or (aiohttp's client, a case
    it reads) a head a strict parser takes as sent, with no control character but our
    CRLFs."""
    if client == "http1" or case not in AIOHTTP_READS_AS_LINES:
        assert status == 502  # llhttp, or aiohttp's parser, refused it; or our check did
        assert b"X-Injected" not in head
    else:
        assert status == 200
        assert parse(head + b"\r\n\r\n").status == 200
    lines = head.split(b"\r\n")
    assert not any(re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line) for line in lines)


@pytest.mark.parametrize("framing", FRAMINGS.keys())
@pytest.mark.parametrize("client", ["http1", "aiohttp"])
@pytest.mark.parametrize("case", HOSTILE.keys())
async def test_a_control_character_from_the_upstream_never_reaches_the_client(
    aiohttp_client: Any, issuer: FakeIssuer, client: str, case: str, framing: str
) -> None:
    script = answer(HOSTILE[case], framing)
    status, head = await through_the_gateway(aiohttp_client, issuer, client, script)
    assert_well_formed(status, head, client, case)
