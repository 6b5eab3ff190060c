"""One upstream HTTP/1.1 connection: sends a request, frames its response with llhttp.

An ``asyncio.Protocol``; ``httptools`` (llhttp) parses, and this module decides what llhttp
leaves to its caller: HEAD and 1xx responses, bodies ended by the close, bytes past the
end, flow control both ways, and whether the connection may carry another request. The
pool (``pool``) owns connections; ``response.Http1Response`` is what a caller holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools

from gateway.http1.errors import (
    IncompleteResponseError,
    InvalidRequestError,
    MalformedResponseError,
    ServerDisconnectedError,
)
from gateway.http1.wire import CHUNKED_END, NO_BODY_STATUSES, frame_chunk

# Body bytes buffered for a slow consumer before we stop reading the socket, and the level
# at which we read again: the memory of one response stays near this, whatever its size.
# 64 KiB is asyncio's own write high-water mark. With 64 connections each relaying a 1 MiB
# body, peak RSS was 134-144 MiB at 256/64 KiB and 110-114 MiB at 64/16 KiB, for the same
# CPU per request (bench/run.py --bodies 1m, 3 rounds).
_HIGH_WATER_BYTES = 64 * 1024
_LOW_WATER_BYTES = 16 * 1024
# SECURITY: llhttp sets no limit on a head; without one an upstream streaming header lines
# (or endless 1xx responses) grows our memory. nginx's default is 4-8 KiB; aiohttp's 8 KiB
# a line.
_MAX_HEAD_BYTES = 64 * 1024
_SURROGATE = "surrogateescape"  # as aiohttp decodes header bytes: lossless, and the same


class _BytesAfterResponseError(Exception):
    """Raised inside the parser to stop it at a second message we never asked for."""


class _HeadTooLargeError(Exception):
    """Raised inside the parser when a head's fields pass ``_MAX_HEAD_BYTES``."""


class Http1Connection(asyncio.Protocol):
    """A connection carrying one exchange at a time (no pipelining)."""

    __slots__ = (
        "_active",
        "_body",
        "_buffered_bytes",
        "_chunked",
        "_close_delimited",
        "_closed",
        "_complete",
        "_connection_tokens",
        "_content_length",
        "_drain_waiter",
        "_exc",
        "_got_bytes",
        "_head_bytes",
        "_head_done",
        "_head_request",
        "_header_bytes",
        "_headers",
        "_informational",
        "_interim_seen",
        "_keep_alive",
        "_loop",
        "_lost",
        "_on_gone",
        "_parser",
        "_read_deadline",
        "_read_timer",
        "_reading_paused",
        "_reason",
        "_request_sent",
        "_stalled_since",
        "_status",
        "_transport",
        "_waiter",
        "_write_paused",
        "_writer",
        "exchanges",
        "idle_since",
        "key",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, int],
        on_gone: Callable[[Http1Connection], None],
    ) -> None:
        self.key = key
        self.idle_since = 0.0
        self.exchanges = 0  # requests begun here; more than one means the connection was reused
        self._loop = loop
        self._on_gone = on_gone
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._lost: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        # The read timeout's one timer, kept across waits (see ``_wait``).
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_deadline = 0.0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._writer: asyncio.Task[None] | None = None
        self._active = False
        self._begin_state(head_request=False)

    def _begin_state(self, *, head_request: bool) -> None:
        # A fresh parser per exchange (as cheap as resetting one, ~1 µs): after a HEAD
        # response llhttp still waits for the body its Content-Length announced.
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._got_bytes = False
        self._informational = False
        self._interim_seen = False
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._content_length: int | None = None
        self._chunked = False
        self._connection_tokens: frozenset[bytes] = frozenset()
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._header_bytes = 0  # bytes of the current message's fields
        self._head_done = False
        self._complete = False
        self._close_delimited = False
        self._keep_alive = False
        self._request_sent = False
        self._body: deque[bytes] = deque()
        self._buffered_bytes = 0
        self._reading_paused = False
        self._stalled_since = 0.0
        self._exc: BaseException | None = None

    # -- what the pool and the response read --------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self._transport is None or self._transport.is_closing()

    @property
    def reusable(self) -> bool:
        """Whole request sent, whole response framed, keep-alive allowed, nothing wrong."""
        return (
            self._complete
            and self._keep_alive
            and self._request_sent
            and self._exc is None
            and not self.closed
        )

    @property
    def stalled_since(self) -> float | None:
        """Since when the socket has not been read because this exchange's reader left the
        high-water mark unread (a relay whose client takes nothing), or ``None``."""
        return self._stalled_since if self._reading_paused and self._active else None

    @property
    def head(self) -> tuple[int, str, list[tuple[str, str]], int | None]:
        return (
            self._status,
            self._reason.decode("utf-8", _SURROGATE),
            self._headers,
            self._content_length,
        )

    # -- the exchange --------------------------------------------------------------------

    def begin(self, *, head_request: bool) -> None:
        if self.exchanges:
            self._begin_state(head_request=head_request)
        else:
            self._head_request = head_request
        self.exchanges += 1
        self._active = True

    def send(self, data: bytes, *, complete: bool) -> None:
        if self.closed or self._transport is None:
            raise ServerDisconnectedError("the upstream closed the connection")
        self._transport.write(data)
        self._request_sent = complete

    def send_stream(self, body: AsyncIterator[bytes], declared_bytes: int | None) -> None:
        """Send a streamed body from a task, so a response can arrive while it uploads."""
        self._writer = self._loop.create_task(self._write_stream(body, declared_bytes))
        self._writer.add_done_callback(self._on_writer_done)

    def finish(self) -> None:
        """The exchange is over and the connection goes idle."""
        self._active = False
        self._writer = None
        self._body.clear()
        self._buffered_bytes = 0
        if self._reading_paused:  # released with its body unread past the high-water mark
            self._reading_paused = False
            if self._transport is not None and not self._closed:
                self._transport.resume_reading()
        self.idle_since = self._loop.time()

    def close(self) -> None:
        self._active = False
        self._stop_read_timer()
        if not self._complete and self._exc is None:  # someone may still be reading
            self._exc = ConnectionAbortedError("the connection was closed by its pool")
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    async def wait_closed(self) -> None:
        pending: list[asyncio.Future[None]] = [self._lost]
        if self._writer is not None:
            pending.append(self._writer)
        await asyncio.wait(pending)

    async def read_head(self, timeout_s: float) -> None:
        while not self._head_done:
            if self._exc is not None:
                raise self._exc
            await self._wait(timeout_s)

    async def read_chunk(self, timeout_s: float) -> bytes:
        """The next piece of body as it arrived, or ``b""`` once the body is complete."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered_bytes -= len(chunk)
                if self._reading_paused and self._buffered_bytes <= _LOW_WATER_BYTES:
                    self._reading_paused = False
                    if self._transport is not None and not self._closed:
                        self._transport.resume_reading()
                return chunk
            if self._complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait(timeout_s)

    async def read_all(self, timeout_s: float) -> bytes:
        if self._complete and len(self._body) <= 1:  # the common case: it all came at once
            data = self._body.popleft() if self._body else b""
            self._buffered_bytes = 0
            return data
        parts = []
        while chunk := await self.read_chunk(timeout_s):
            parts.append(chunk)
        return b"".join(parts)

    async def _wait(self, timeout_s: float) -> None:
        # The read timeout is silence while someone waits: a consumer that is slow on
        # purpose (reading paused) is not timed out by the upstream's account.
        waiter = self._loop.create_future()
        self._waiter = waiter
        deadline = self._read_deadline = self._loop.time() + timeout_s
        # One timer per connection, not one per wait: a timer due no later than this
        # deadline looks again when it fires (``_check_read_timeout``); only one due later
        # (a shorter timeout than the last) is replaced. Each wait costs a clock read, not
        # a timer made and cancelled (two per request).
        timer = self._read_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._read_timer = self._loop.call_at(deadline, self._check_read_timeout)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_read_timeout(self) -> None:
        self._read_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no one waits now: the next wait arms the timer again
        if self._loop.time() >= self._read_deadline:
            self._fail(TimeoutError("the upstream sent nothing within the read timeout"))
        else:  # this wait began after the timer was set: its own deadline is later
            self._read_timer = self._loop.call_at(self._read_deadline, self._check_read_timeout)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    # -- the streamed request body -------------------------------------------------------

    async def _write_stream(self, body: AsyncIterator[bytes], declared_bytes: int | None) -> None:
        transport = self._transport
        assert transport is not None  # send() ran first
        sent_bytes = 0
        async for chunk in body:
            if self.closed:
                return  # the upstream is gone; connection_lost has said why, if it matters
            if not chunk:
                continue
            sent_bytes += len(chunk)
            if declared_bytes is None:
                transport.writelines(frame_chunk(chunk))
            elif sent_bytes > declared_bytes:
                raise InvalidRequestError("the request body is longer than its Content-Length")
            else:
                transport.write(chunk)
            while self._write_paused and not self.closed:
                self._drain_waiter = self._loop.create_future()
                await self._drain_waiter
        if self.closed:
            return
        if declared_bytes is None:
            transport.write(CHUNKED_END)
        elif sent_bytes != declared_bytes:
            raise InvalidRequestError("the request body is shorter than its Content-Length")
        self._request_sent = True

    def _on_writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The body's own error (a PayloadTooLargeError, say) reaches whoever waits.
            self._fail(exc)
        if self._closed:
            self._on_gone(self)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            # We never pipeline: bytes on an idle connection mean its framing is lost.
            self.close()
            return
        self._got_bytes = True
        if self._complete:
            # More after the response ended (even the empty lines llhttp skips between
            # messages, RFC 9112 §2.2): this upstream's framing is not to be trusted again.
            self._keep_alive = False
        if not self._head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedResponseError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            if self._complete:  # more than the framing announced: never reuse
                self._keep_alive = False
                if self._transport is not None:
                    self._transport.abort()
            elif isinstance(exc.__context__, _HeadTooLargeError):
                self._fail(MalformedResponseError("the upstream's response head is too large"))
            else:
                error = MalformedResponseError("the upstream sent a malformed response")
                error.__cause__ = exc
                self._fail(error)
            return
        if not self._head_done and self._head_bytes > _MAX_HEAD_BYTES:
            # A field still incomplete: httptools buffers it before calling on_header.
            self._fail(MalformedResponseError("the upstream's response head is too large"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop_read_timer()
        if self._active and not self._complete:
            if self._head_done and self._close_delimited and exc is None:
                self._complete = True  # RFC 9112 §6.3 (8): the close ends this body
            else:
                error: ConnectionError
                if not self._got_bytes:
                    error = ServerDisconnectedError("the upstream closed the connection")
                else:
                    error = IncompleteResponseError("the upstream closed mid-response")
                error.__cause__ = exc
                if self._exc is None:
                    self._exc = error
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self._lost.done():
            self._lost.set_result(None)
        if self._writer is None or self._writer.done():
            self._on_gone(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._keep_alive = False
            raise _BytesAfterResponseError
        if self._informational:  # the final response follows an interim one
            self._informational = False
            self._header_bytes = 0
            self._reason = b""
            self._headers = []
            self._content_length = None
            self._chunked = False
            self._connection_tokens = frozenset()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # llhttp may hand a span over in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field (RFC 9112 §7.1.2): framing only, not forwarded
        size = len(name)
        self._header_bytes += size + len(value) + 4
        if self._header_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLargeError
        self._headers.append((name.decode("utf-8", _SURROGATE), value.decode("utf-8", _SURROGATE)))
        if size == 14 and name.lower() == b"content-length":
            self._content_length = int(value)  # llhttp has validated it
        elif size == 17 and name.lower() == b"transfer-encoding":
            # RFC 9112 §6.1: chunked only if it is the final coding.
            self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif size == 10 and name.lower() == b"connection":
            self._connection_tokens |= {t.strip() for t in value.lower().split(b",")}

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # RFC 9110 §15.2: interim (100 Continue, 103 Early Hints); 101 raises instead.
            self._informational = True
            self._interim_seen = True
            return
        self._status = status
        version = self._parser.get_http_version()
        if version == "1.1":
            keep_alive = b"close" not in self._connection_tokens
        else:  # HTTP/1.0 keeps the connection only when it says so
            keep_alive = version == "1.0" and b"keep-alive" in self._connection_tokens
        if self._chunked:
            self._content_length = None  # RFC 9112 §6.3 (3): Transfer-Encoding wins
        if self._interim_seen:
            # SECURITY: after an interim response the framing is the upstream's word alone
            # (one more 1xx, or none); a connection in doubt carries nothing more.
            keep_alive = False
        if self._head_request or status in NO_BODY_STATUSES:
            # RFC 9112 §6.3 (1): no body whatever the headers say. llhttp does not know
            # the method, so a HEAD's exchange ends here and its parser is dropped.
            self._complete = True
            if self._chunked or self._content_length:
                # SECURITY: a body announced that must not come; a server that sends it
                # anyway (late, in another segment) would have it read as the next
                # request's response, someone else's. Such a connection is not reused.
                keep_alive = False
        elif not self._chunked and self._content_length is None:
            self._close_delimited = True
            keep_alive = False
        self._keep_alive = keep_alive
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:  # bytes after a HEAD response's head
            self._keep_alive = False
            return
        self._body.append(body)
        self._buffered_bytes += len(body)
        if self._buffered_bytes > _HIGH_WATER_BYTES and not self._reading_paused:
            self._reading_paused = True
            self._stalled_since = self._loop.time()
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational or self._complete:
            return
        self._complete = True
        self._wake()
