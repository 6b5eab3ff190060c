"""The keep-alive pool: connections per (host, port), a limit each, idle expiry, one retry.

``Http1Pool.request`` sends one request and returns its ``Http1Response`` once the final
head has arrived. Framing is ``connection``'s job, serialisation ``wire``'s; mapping errors
to HTTP statuses is the caller's (``TimeoutError`` → 504, any other ``OSError`` → 502).

A client that stops reading a streamed response stalls its relay, and the relay stops
reading the upstream connection (``connection``'s high-water mark): that connection is
lent out, doing nothing, until the client's send timeout. When a request waits for a
connection to a host at its limit, the connection of that host stalled longest, for at
least ``reclaim_stalled_after_s``, is closed and its slot given to the request. The
stalled relay keeps what it had read; if the response had not all arrived, the rest is
lost and the relay aborts its client when it gets that far. Why this way: nginx buffers
responses (to disk, up to 1 GiB) and frees the upstream at once, but buffering in memory
costs a stalled client as much as its response, which a flood of them multiplies; letting
waiters open connections beyond the limit breaks the promise the limit makes to the
upstream, whose own workers the stalled connections still occupy. Reclaiming costs
nothing per request (the time is taken when reading pauses) and only clients that have
read nothing for seconds, only when others need their connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

from gateway.http1.connection import Http1Connection
from gateway.http1.errors import PoolClosedError, ServerDisconnectedError
from gateway.http1.response import Http1Response
from gateway.http1.wire import Body, build_authority, build_head

log = logging.getLogger(__name__)

# A bytes body up to this size goes out in the same write as the head: one segment.
_COALESCE_BYTES = 16 * 1024
# A relay that has read nothing for this long, because its client takes nothing, gives its
# connection to a request waiting for one. Its client's last 48 KiB (the high-water mark
# down to the low one) then took this long: below 24 KiB/s, where a download is dead or a
# slow read on purpose. Short, because the waiting request's connect_timeout_s runs.
_RECLAIM_STALLED_AFTER_S = 2.0


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

    def __init__(
        self,
        *,
        limit_per_host: int = 100,
        idle_timeout_s: float = 15.0,
        reclaim_stalled_after_s: float = _RECLAIM_STALLED_AFTER_S,
    ) -> None:
        if limit_per_host < 1:
            raise ValueError("limit_per_host must be at least 1")
        self._limit = limit_per_host
        self._idle_timeout_s = idle_timeout_s
        self._reclaim_after_s = reclaim_stalled_after_s
        self._hosts: dict[tuple[str, int], _Host] = {}
        self._conns: set[Http1Connection] = set()
        self._reclaimed: set[Http1Connection] = set()  # closed by us, still lent out
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        # The loop of the first request; every connection is bound to it anyway. Kept: in
        # Python 3.11 asyncio.get_running_loop() asks the kernel for the pid on each call.
        self._loop: asyncio.AbstractEventLoop | None = None

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
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
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
        if self._reclaimed and conn in self._reclaimed:
            self._reclaimed.discard(conn)  # its slot went to a waiting request already
            return
        entry = self._hosts[conn.key]
        if not discard and not self._closed and conn.reusable:
            conn.finish()  # idle: from now on any byte from the upstream closes it
            # SECURITY: it rejoins the pool after the loop has read its socket once more
            # (a timer runs after the next poll), so bytes the upstream sent past the end
            # of its response close it here instead of becoming the next request's
            # response, someone else's. It stays counted as busy until then.
            entry.returning += 1
            self._running_loop().call_later(0, self._return_idle, entry, conn)
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
            conn.idle_since = self._running_loop().time()
            entry.idle.append(conn)
            if self._sweep is None:
                self._sweep = self._running_loop().call_later(
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

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop or asyncio.get_running_loop()

    async def _acquire(self, entry: _Host, timeout_s: float, *, fresh: bool) -> Http1Connection:
        loop = self._running_loop()
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
            recheck_at = self._reclaim_stalled(entry, now)
            if recheck_at is None:
                continue  # a slot is free now
            await self._wait_for_slot(loop, entry, deadline, recheck_at)
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

    def _reclaim_stalled(self, entry: _Host, now: float) -> float | None:
        """Close the connection of ``entry`` stalled longest, if long enough, and free its
        slot (``None``); else when to look again."""
        stalled: Http1Connection | None = None
        since = now
        for conn in self._conns:
            conn_since = conn.stalled_since
            if (
                conn_since is not None
                and conn_since < since
                and conn.key == entry.key
                and conn not in self._reclaimed
            ):
                stalled, since = conn, conn_since
        if stalled is None or now - since < self._reclaim_after_s:
            return since + self._reclaim_after_s  # a stall may yet begin: look again then
        log.info(
            "upstream_connection_reclaimed",
            extra={"upstream": entry.authority.decode(), "stalled_s": round(now - since, 3)},
        )
        self._reclaimed.add(stalled)
        entry.busy -= 1
        stalled.close()
        return None

    async def _wait_for_slot(
        self,
        loop: asyncio.AbstractEventLoop,
        entry: _Host,
        deadline: float,
        recheck_at: float | None = None,
    ) -> None:
        """Wait until a slot may be free: woken by a release, or at ``recheck_at``."""
        remaining_s = deadline - loop.time()
        if remaining_s <= 0:
            raise TimeoutError("no upstream connection became free within the timeout")
        waiter: asyncio.Future[None] = loop.create_future()
        entry.waiters.append(waiter)
        if recheck_at is not None and recheck_at < deadline:
            timer = loop.call_at(recheck_at, _wake, waiter)
        else:
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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no upstream connection became free in time"))
