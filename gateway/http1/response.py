"""The response a caller holds: status, headers, and the body read whole or streamed.

It borrows a pooled connection until ``release()`` (or the end of the body) hands it back;
whether the connection is reused is the pool's decision, from the connection's framing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol

from gateway.http1.connection import Http1Connection


class _Releaser(Protocol):
    def release_connection(self, conn: Http1Connection, *, discard: bool) -> None: ...


class Http1Response:
    """A response head and its body still on the wire.

    ``headers`` is a list of ``(name, value)`` ``str`` pairs in arrival order, decoded as
    aiohttp decodes them (UTF-8, surrogateescape), trailers excluded: filter it and hand it
    straight to ``web.StreamResponse`` / ``upstream.BufferedResponse``. ``content_length``
    is the declared one (``None`` for chunked or close-delimited bodies); for HEAD, 204 and
    304 there is no body whatever it says.
    """

    __slots__ = (
        "_conn",
        "_pool",
        "_read_timeout_s",
        "_released",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, pool: _Releaser, conn: Http1Connection, read_timeout_s: float) -> None:
        self.status, self.reason, self.headers, self.content_length = conn.head
        self._conn = conn
        self._pool = pool
        self._read_timeout_s = read_timeout_s
        self._released = False

    async def read(self) -> bytes:
        """The whole body; releases the connection."""
        try:
            data = await self._conn.read_all(self._read_timeout_s)
        except BaseException:
            self.close()
            raise
        self.release()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, never buffering more than a high-water mark.

        When the consumer lags, the socket stops being read (``pause_reading``) and the
        upstream's TCP window fills; raises ``TimeoutError`` after ``read_timeout_s`` of
        silence and ``IncompleteResponseError`` on a premature close. Releases at the end;
        a consumer that stops early closes the connection.
        """
        conn = self._conn
        timeout_s = self._read_timeout_s
        try:
            while chunk := await conn.read_chunk(timeout_s):
                yield chunk
        except BaseException:  # GeneratorExit too: the rest of the body is unread
            self.close()
            raise
        self.release()

    def release(self) -> None:
        """Give the connection back: reused if its exchange ended cleanly, closed if not."""
        if not self._released:
            self._released = True
            self._pool.release_connection(self._conn, discard=False)

    def close(self) -> None:
        """Close the connection whatever its state."""
        if not self._released:
            self._released = True
            self._pool.release_connection(self._conn, discard=True)

    async def __aenter__(self) -> Http1Response:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.release()
        else:
            self.close()
