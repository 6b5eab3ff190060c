"""Clients that stall on purpose, on raw sockets: one that never reads, and a way to learn
when the server closed a socket we never read from. For the slow-client tests."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SMALL_RCVBUF = 4096  # so that a client reading nothing stalls after a few KiB


class Hangups:
    """When the server closes sockets we never read from: epoll reports EPOLLRDHUP (a FIN)
    or EPOLLHUP/EPOLLERR (a reset) whatever data waits unread, which a read would consume
    (and a read is what the send timeout counts as progress)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._closed: dict[int, asyncio.Future[float]] = {}
        self._loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, sock: socket.socket) -> asyncio.Future[float]:
        """A future set to the loop time at which ``sock`` was closed by its peer."""
        closed: asyncio.Future[float] = self._loop.create_future()
        self._closed[sock.fileno()] = closed
        self._epoll.register(sock.fileno(), select.EPOLLRDHUP)  # HUP and ERR come unasked
        return closed

    def _ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            self._epoll.unregister(fd)
            closed = self._closed.pop(fd)
            if not closed.done():
                closed.set_result(self._loop.time())

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


async def open_non_reader(port: int, request: bytes) -> socket.socket:
    """A socket that sends ``request`` and will never read: a tiny receive buffer fills."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent before it closed (by FIN or by reset)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            received += chunk
    return received


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n"
