"""The keep-alive pool: connections per (host, port), a limit each, idle expiry, one retry.

``Http1Pool.request`` sends one request and returns its ``Http1Response`` once the final
head has arrived. Framing is ``connection``'s job, serialisation ``wire``'s; mapping errors
to HTTP statuses is the caller's (``TimeoutError`` → 504, any other ``OSError`` → 502).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from gateway.http1.connection import Http1Connection
from gateway.http1.errors import PoolClosedError, ServerDisconnectedError
from gateway.http1.response import Http1Response
from gateway.http1.wire import Body, build_authority, build_head

# A bytes body up to this size goes out in the same write as the head: one segment.
_COALESCE_BYTES = 16 * 1024


class _Host:
    __slots__ = ("authority", "busy", "idle", "key", "returning", "waiters")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.authority = build_authority(*key)
        self.idle: list[Http1Connection] = []  # oldest first; reuse takes the newest
        self.busy = 0  # connections lent out, being opened or returning; at most the limit
        self.returning = 0  # released, rejoining idle after one more read of their socket
        self.waiters: deque[asyncio.Future[None]] = deque()


class Http1Pool:
    """Owns every upstream connection it opens; ``aclose()`` closes them all."""

    def __init__(self, *, limit_per_host: int = 100, idle_timeout_s: float = 15.0) -> None:
        if limit_per_host < 1:
            raise ValueError("limit_per_host must be at least 1")
        self._limit = limit_per_host
        self._idle_timeout_s = idle_timeout_s
        self._hosts: dict[tuple[str, int], _Host] = {}
        self._conns: set[Http1Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: Body = None,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> Http1Response:
        """Send a request; return once the final response head has arrived.

        ``target`` is the request-target as sent (origin-form, already encoded). A bytes
        body gets ``Content-Length``; a stream is sent chunked unless ``headers`` declare
        its ``Content-Length``. ``connect_timeout_s`` bounds waiting for a free slot and
        connecting; ``read_timeout_s`` each wait for the upstream (head, then body).
        """
        if self._closed:
            raise PoolClosedError("the pool is closed")
        entry = self._hosts.get((host, port))
        if entry is None:
            entry = self._hosts[(host, port)] = _Host((host, port))
        head, declared_bytes = build_head(method, target, entry.authority, headers, body)
        stream: AsyncIterator[bytes] | None = None
        data: bytes | None = None
        if isinstance(body, bytes):
            if len(body) <= _COALESCE_BYTES:
                head += body
            else:
                data = body
        elif body is not None:
            stream = body
        is_head = method == "HEAD"
        fresh = False
        while True:
            conn = await self._acquire(entry, connect_timeout_s, fresh=fresh)
            reused = conn.exchanges > 0
            try:
                conn.begin(head_request=is_head)
                if stream is not None:
                    conn.send(head, complete=False)
                    conn.send_stream(stream, declared_bytes)
                elif data is None:
                    conn.send(head, complete=True)
                else:
                    conn.send(head, complete=False)
                    conn.send(data, complete=True)
                await conn.read_head(read_timeout_s)
            except ServerDisconnectedError:
                self.release_connection(conn, discard=True)
                # RFC 9112 §9.3.1: a kept-alive connection the upstream closed as we sent,
                # before one byte of an answer. A replayable request gets one fresh try.
                if reused and stream is None and not fresh:
                    fresh = True
                    continue
                raise
            except BaseException:
                self.release_connection(conn, discard=True)
                raise
            return Http1Response(self, conn, read_timeout_s)

    def release_connection(self, conn: Http1Connection, *, discard: bool) -> None:
        entry = self._hosts[conn.key]
        if not discard and not self._closed and conn.reusable:
            conn.finish()  # idle: from now on any byte from the upstream closes it
            # SECURITY: it rejoins the pool after the loop has read its socket once more
            # (a timer runs after the next poll), so bytes the upstream sent past the end
            # of its response close it here instead of becoming the next request's
            # response, someone else's. It stays counted as busy until then.
            entry.returning += 1
            asyncio.get_running_loop().call_later(0, self._return_idle, entry, conn)
            return
        entry.busy -= 1
        conn.close()
        self._wake_one(entry)

    def _return_idle(self, entry: _Host, conn: Http1Connection) -> None:
        entry.busy -= 1
        entry.returning -= 1
        if self._closed or conn.closed:
            conn.close()
        else:
            conn.idle_since = asyncio.get_running_loop().time()
            entry.idle.append(conn)
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(
                    self._idle_timeout_s, self._close_expired
                )
        self._wake_one(entry)

    async def aclose(self) -> None:
        """Close every connection, idle or lent out, and wait until each is closed."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for entry in self._hosts.values():
            entry.idle.clear()
            for waiter in entry.waiters:
                if not waiter.done():
                    waiter.set_exception(PoolClosedError("the pool is closed"))
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.gather(*(conn.wait_closed() for conn in conns))

    async def __aenter__(self) -> Http1Pool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- connections ---------------------------------------------------------------------

    async def _acquire(self, entry: _Host, timeout_s: float, *, fresh: bool) -> Http1Connection:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout_s
        while True:
            if not fresh:
                oldest_allowed = now - self._idle_timeout_s
                while entry.idle:
                    conn = entry.idle.pop()
                    if not conn.closed and conn.idle_since > oldest_allowed:
                        entry.busy += 1
                        return conn
                    conn.close()
            if not fresh and entry.returning > len(entry.waiters):
                # A connection rejoins within a loop iteration: wait for it rather than
                # open another (a client's next request on its keep-alive connection).
                await self._wait_for_slot(loop, entry, deadline)
                now = loop.time()
                continue
            if entry.busy < self._limit:
                entry.busy += 1
                try:
                    return await self._connect(loop, entry, deadline - loop.time())
                except BaseException:
                    entry.busy -= 1
                    self._wake_one(entry)
                    raise
            await self._wait_for_slot(loop, entry, deadline)
            now = loop.time()

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, entry: _Host, timeout_s: float
    ) -> Http1Connection:
        host, port = entry.key
        async with asyncio.timeout(timeout_s):
            _, conn = await loop.create_connection(
                lambda: Http1Connection(loop, entry.key, self._forget), host, port
            )
        self._conns.add(conn)
        if self._closed:  # aclose() ran while we connected
            conn.close()
            raise PoolClosedError("the pool is closed")
        return conn

    async def _wait_for_slot(
        self, loop: asyncio.AbstractEventLoop, entry: _Host, deadline: float
    ) -> None:
        remaining_s = deadline - loop.time()
        if remaining_s <= 0:
            raise TimeoutError("no upstream connection became free within the timeout")
        waiter: asyncio.Future[None] = loop.create_future()
        entry.waiters.append(waiter)
        timer = loop.call_later(remaining_s, _expire, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._wake_one(entry)  # we were woken but will not use it: pass it on
            raise
        finally:
            timer.cancel()
            if waiter in entry.waiters:
                entry.waiters.remove(waiter)

    def _wake_one(self, entry: _Host) -> None:
        while entry.waiters:
            waiter = entry.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _forget(self, conn: Http1Connection) -> None:
        self._conns.discard(conn)

    def _close_expired(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweep = None
        oldest_allowed = loop.time() - self._idle_timeout_s
        next_expiry: float | None = None
        for entry in self._hosts.values():
            if not entry.idle:
                continue
            kept = []
            for conn in entry.idle:
                if conn.closed or conn.idle_since <= oldest_allowed:
                    conn.close()
                else:
                    kept.append(conn)
            entry.idle = kept
            if kept:  # oldest first
                expiry = kept[0].idle_since + self._idle_timeout_s
                next_expiry = expiry if next_expiry is None else min(next_expiry, expiry)
        if next_expiry is not None:
            self._sweep = loop.call_at(next_expiry, self._close_expired)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no upstream connection became free in time"))
