"""Response framing under generated inputs: a valid response split anywhere parses the same;
a response whose framing is in doubt (bytes past its end, a HEAD reply that announces a
body, an interim response, conflicting lengths, bad chunk sizes) never leaves a connection
that could be reused, and no request ever receives a response that is not its own.

The connection is driven byte for byte through its ``asyncio.Protocol`` methods with a
recording transport (no timing involved); the pool, through real sockets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway.http1 import Http1Error, Http1Pool
from gateway.http1.connection import Http1Connection
from tests.fakes.raw_http import RawConn, raw_servers

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Resp: smuggled\r\n\r\nsmuggled"


@dataclass
class RecordingTransport:
    """Enough of ``asyncio.Transport`` for one connection: records, never sends."""

    written: list[bytes] = field(default_factory=list)
    aborted: bool = False
    paused: bool = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: Any) -> None:
        self.written.extend(data)

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    chunks: tuple[int, ...] | None  # chunk sizes when chunked, else Content-Length framing

    def encode(self, *, marker: str) -> bytes:
        head = f"HTTP/1.1 {self.status} Reason\r\nX-Resp: {marker}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        if self.chunks is None:
            return f"{head}Content-Length: {len(self.body)}\r\n\r\n".encode() + self.body
        parts = [f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()]
        offset = 0
        for size in self.chunks:
            piece = self.body[offset : offset + size]
            offset += size
            if piece:  # an empty chunk would end the body
                parts.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        parts.append(b"0\r\nX-Trailer: t\r\n\r\n")
        return b"".join(parts)


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
responses = st.builds(
    lambda status, headers, body, chunked, sizes: Response(
        status,
        tuple((f"X-{name}", value) for name, value in headers),
        body,
        tuple(sizes) if chunked and body else None,
    ),
    st.sampled_from([200, 201, 202, 400, 401, 403, 404, 500, 502]),
    st.lists(st.tuples(_TOKEN, _TOKEN), max_size=4),
    st.binary(max_size=300),
    st.booleans(),
    st.lists(st.integers(1, 64), min_size=1, max_size=8).map(lambda s: [*s, 1000]),
)


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
    )


def feed(parts: list[bytes], *, head_request: bool = False) -> tuple[Http1Connection, Any]:
    loop = asyncio.get_running_loop()
    conn = Http1Connection(loop, ("upstream", 80), lambda _: None)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.begin(head_request=head_request)
    conn.send(b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n", complete=True)
    for part in filter(None, parts):  # asyncio never delivers b"" (llhttp reads it as EOF)
        if transport.aborted:
            break
        conn.data_received(part)
    return conn, transport


async def body_of(conn: Http1Connection) -> bytes:
    return await conn.read_all(timeout_s=1)  # complete: returns without waiting


@given(data=st.data(), response=responses)
async def test_a_valid_response_split_anywhere_parses_the_same_and_is_reusable(
    data: st.DataObject, response: Response
) -> None:
    raw = response.encode(marker="own")
    conn, transport = feed(data.draw(splits(raw)))
    status, _, headers, _ = conn.head
    assert status == response.status
    assert ("X-Resp", "own") in headers
    assert await body_of(conn) == response.body
    assert conn.reusable
    assert not transport.aborted


async def test_a_connection_finished_with_its_body_unread_reads_again() -> None:
    # A whole 100 KiB body arrived (reading paused past the high-water mark) and the
    # caller released it unread: the idle connection must read again, or the next request
    # on it would wait for its read timeout.
    body = b"x" * (100 * 1024)
    conn, transport = feed([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)])
    assert conn.reusable
    assert transport.paused
    conn.finish()
    assert not transport.paused


@st.composite
def doubtful(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A response (its raw bytes, and whether it answers a HEAD) whose framing is in doubt."""
    response = draw(responses)
    raw = response.encode(marker="own")
    kind = draw(
        st.sampled_from(
            ["excess", "head_with_length", "interim", "cl_and_te", "bad_chunk", "two_lengths"]
        )
    )
    if kind == "excess":
        # Not b"\r\n" alone: llhttp skips empty lines between messages (RFC 9112 §2.2), and
        # within the response's own segment they cannot be told apart from nothing.
        return raw + draw(st.sampled_from([SMUGGLED, b"x", b"\r\nx", SMUGGLED[:10]])), False
    if kind == "head_with_length":
        announced = Response(response.status, response.headers, response.body or b"x", None)
        head = announced.encode(marker="own")
        head = head[: head.index(b"\r\n\r\n") + 4]
        return head + draw(st.sampled_from([b"", SMUGGLED])), True
    if kind == "interim":
        interim = draw(st.sampled_from([b"100 Continue", b"103 Early Hints", b"102 Processing"]))
        return b"HTTP/1.1 " + interim + b"\r\n\r\n" + raw, False
    if kind == "cl_and_te":
        chunked = Response(response.status, response.headers, b"abc", (3, 1000))
        encoded = chunked.encode(marker="own")
        return encoded.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n", 1), False
    if kind == "bad_chunk":
        size = draw(st.sampled_from([b"zz", b"-1", b"1" * 20, b"", b"0x10"]))
        return (
            b"HTTP/1.1 200 OK\r\nX-Resp: own\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size
            + b"\r\nabc\r\n0\r\n\r\n"
        ), False
    return (
        b"HTTP/1.1 200 OK\r\nX-Resp: own\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ), False


@given(data=st.data(), case=doubtful())
async def test_a_response_in_doubt_never_leaves_a_reusable_connection(
    data: st.DataObject, case: tuple[bytes, bool]
) -> None:
    raw, head_request = case
    conn, _ = feed(data.draw(splits(raw)), head_request=head_request)
    assert not conn.reusable
    if conn.head[0]:
        assert ("X-Resp", "smuggled") not in conn.head[2]


async def test_bytes_already_on_the_socket_at_release_never_reach_the_next_request() -> None:
    # The window a pool must not offer: the response is complete, and more bytes sit in
    # our socket's buffer, not yet read, when the connection is released and the next
    # request goes out. The connection rejoins the pool only after the loop has read them.
    served: list[RawConn] = []

    async def script(conn: RawConn) -> None:
        served.append(conn)
        while (request := await conn.read_request()) is not None:
            marker = request.target.encode()
            await conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(marker), marker)
            )

    async def get(pool: Http1Pool, port: int, target: bytes) -> bytes:
        response = await pool.request(
            "GET", "127.0.0.1", port, target, [], None, connect_timeout_s=5, read_timeout_s=5
        )
        return await response.read()

    async with raw_servers() as start, Http1Pool(limit_per_host=1) as pool:
        server = await start(script)
        first = await pool.request(
            "GET", "127.0.0.1", server.port, b"/1", [], None, connect_timeout_s=5, read_timeout_s=5
        )
        # Written now, synchronously: on loopback the bytes are in our socket's buffer
        # before the loop runs again, i.e. before anything reads them.
        served[0].writer.write(SMUGGLED)
        assert await first.read() == b"/1"  # complete: released without a loop iteration
        assert await get(pool, server.port, b"/2") == b"/2"
        assert server.connections == 2


@hypothesis_settings(max_examples=40)
@given(
    plan=st.lists(
        st.tuples(st.booleans(), st.sampled_from([b"", SMUGGLED, b"junk", b"HTTP/1.1 200"])),
        min_size=2,
        max_size=6,
    )
)
async def test_every_request_gets_its_own_response_or_an_error(
    plan: list[tuple[bool, bytes]],
) -> None:
    # Request i is answered with a response marked i. A GET's extra bytes follow its body
    # in the same write; a HEAD gets a head announcing a body, and its extra bytes come
    # late, when the next request arrives on that connection (a server sending the body it
    # should not have). Whatever the plan, a response read by request i is marked i.
    async def script(conn: RawConn) -> None:
        late = b""
        while (request := await conn.read_request()) is not None:
            marker = request.target.lstrip("/").encode()
            head_request, extra = plan[int(marker)]
            body = b"" if head_request else marker
            head = b"HTTP/1.1 200 OK\r\nX-Resp: %s\r\nContent-Length: %d\r\n\r\n" % (
                marker,
                len(marker),
            )
            conn.writer.write(late + head + body + (b"" if head_request else extra))
            late = extra if head_request else b""
            await conn.writer.drain()

    async with raw_servers() as start, Http1Pool(limit_per_host=2) as pool:
        server = await start(script)
        for index, (head_request, _) in enumerate(plan):
            try:
                response = await pool.request(
                    "HEAD" if head_request else "GET",
                    "127.0.0.1",
                    server.port,
                    b"/%d" % index,
                    [],
                    None,
                    connect_timeout_s=5,
                    read_timeout_s=5,
                )
                body = await response.read()
            except Http1Error:
                continue  # an error is an honest answer; someone else's response is not
            assert ("X-Resp", str(index)) in response.headers
            assert body == (b"" if head_request else str(index).encode())
