"""Loopback servers that speak HTTP/1.1 byte for byte, for tests of the upstream client.

``RawServer`` runs one scripted coroutine per accepted connection and counts connections
and requests where they arrive; every transport it accepted is closed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RawRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)


@dataclass
class RawConn:
    server: RawServer
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_request(self) -> RawRequest | None:
        """The next whole request on this connection, or ``None`` if the client closed first."""
        try:
            return await self._read_request()
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        except ValueError:  # a chunk-size line cut short by the close
            return None

    async def _read_request(self) -> RawRequest:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        ]
        found = dict(headers)
        raw = head
        if "content-length" in found:
            body = await self.reader.readexactly(int(found["content-length"]))
            raw += body
        elif found.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line = await self.reader.readline()
                raw += size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    raw += await self.reader.readuntil(b"\r\n")  # no trailers from us
                    break
                chunk = await self.reader.readexactly(size + 2)
                raw += chunk
                body += chunk[:-2]
        else:
            body = b""
        request = RawRequest(method, target, headers, body, raw)
        self.server.requests.append(request)
        self.server.changed.set()
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# Responses no HTTP/1.1 client may accept: a bad status line, not HTTP, two lengths, a
# length and chunked together (request smuggling's raw material).
MALFORMED_RESPONSES = (
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
)
SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
)

Script = Callable[[RawConn], Awaitable[None]]
StartServer = Callable[[Script], Awaitable["RawServer"]]


@dataclass
class RawServer:
    script: Script
    port: int = 0
    connections: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    closed_connections: int = 0
    errors: list[BaseException] = field(default_factory=list)  # a script that failed
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _conns: list[RawConn] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _accepts: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accept = asyncio.current_task()
        assert accept is not None
        self._accepts.add(accept)
        conn = RawConn(self, self.connections, reader, writer)
        self.connections += 1
        self._conns.append(conn)
        self.changed.set()
        # The script runs in a task of ours: cancelling start_server's own task upsets
        # StreamReaderProtocol in 3.11; this one we may cancel at teardown.
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        try:
            await asyncio.wait([task])
            if not task.cancelled() and (error := task.exception()) is not None:
                self.errors.append(error)
        finally:
            self._tasks.discard(task)
            await conn.close()
            self.closed_connections += 1
            self.changed.set()
            self._accepts.discard(accept)

    async def _serve(self, conn: RawConn) -> None:
        with contextlib.suppress(ConnectionError):
            await self.script(conn)
            # Then wait for the client's close, so "closed by the client" can be counted.
            while await conn.reader.read(65536):
                pass

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self._conns:
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._accepts:
            await asyncio.wait(list(self._accepts))
        await self._server.wait_closed()  # 3.11: returns once the listener is closed


def respond_forever(response: bytes) -> Script:
    """A script answering every request on a connection with the same bytes."""

    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(response)

    return script


@contextlib.asynccontextmanager
async def raw_servers() -> AsyncIterator[StartServer]:
    """Start servers inside; each is closed on the way out, and none may have failed."""
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        server = RawServer(script)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.aclose()
    assert [error for server in servers for error in server.errors] == []
