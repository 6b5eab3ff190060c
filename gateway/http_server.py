"""The HTTP/1.1 server under the public and admin apps: aiohttp's, answering as ours and
holding every client connection to its timeouts.

A request head aiohttp's parser refuses (a line over its limits, too many fields, bad
framing, a bad method or character) never reaches a handler: aiohttp answers it with a
plain-text 400 quoting the offending bytes and logs a traceback at ERROR. Here it gets our
JSON 431, 414 or 400 in fixed words, one WARNING ``bad_request_head`` line and a count. No
response names Python's and aiohttp's versions. A head that parses is ``ingress``'s.

Slow clients, with nginx's timeouts (``limits``): each connection has one watchdog timer,
re-armed when it fires, which closes it when its client stalls: a head still incomplete
``client_header_timeout_s`` after the connection opened or after the head's first byte
(with a 408 if part of it came); a request body with no byte for ``client_body_timeout_s``
(408 JSON through ``ingress``, an abort once the response has started); a write the client
has taken nothing of for ``send_timeout_s`` (a reset, so the kernel drops what it holds).
aiohttp's own timer closes idle connections after ``keepalive_timeout_s``. The hot path only
stamps times: no timer per request or per write. Connections beyond ``max_connections`` are
closed on arrival (nginx's ``worker_connections``); the admin server has its own socket and
no cap, so probes and scrapes get through a flood. What a stalled client holds upstream is
``upstream``'s and ``gateway.http1.pool``'s to give back.

This leans on aiohttp's ``RequestHandler`` internals (``_waiter``, ``_current_request``,
``_request_count``, ``_process_keepalive``, ``_drain_helper``); tests/unit/test_client_timeouts.py
pins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import struct
import sys
import termios
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, cast

from aiohttp import web, web_response
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from gateway.errors import (
    BadRequestError,
    GatewayError,
    HeadersTooLargeError,
    MethodNotAllowedError,
    NotFoundError,
    RequestTimeoutError,
    URITooLongError,
)
from gateway.ingress import render_error
from gateway.metrics import Metrics
from gateway.settings import LimitsSettings

log = logging.getLogger(__name__)

SERVER_NAME = "tokengate"
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# aiohttp raises a bare BadHttpMessage for too many header fields, from both its parsers:
# this text of theirs is all that tells it apart (a test pins it).
_TOO_MANY_HEADERS = "Too many headers received"
# SO_LINGER on, 0 s: close() resets the connection and drops what the kernel still holds
# for a client that reads nothing (nginx's reset_timedout_connection).
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)  # Linux; elsewhere ours alone


def classify_bad_head(exc: HttpProcessingError, *, max_line_size: int) -> tuple[str, GatewayError]:
    """The metric reason and our error for a head the parser refused. Fixed words only:
    aiohttp's message quotes the client's bytes, which may be a token."""
    if isinstance(exc, LineTooLong):
        # Both parsers report the limit crossed, and the request line's differs from a
        # header field's (``ingress.aiohttp_parser_limits``).
        if exc.args[1] == max_line_size:
            return "uri_too_long", URITooLongError()
        return "header_too_large", HeadersTooLargeError()
    if type(exc) is BadHttpMessage and exc.message == _TOO_MANY_HEADERS:
        return "header_too_large", HeadersTooLargeError("too many header fields")
    return "bad_request", BadRequestError()


def hide_server_banner() -> None:
    """``Server: tokengate`` on every response aiohttp writes for us, with no version.

    SECURITY: aiohttp names Python's and its own version on every response, by a
    ``setdefault`` from a global of ``aiohttp.web_response``, with no setting to turn it off
    (aiohttp #1958, #3607). Rebinding that global, here only, reaches every response
    (relayed, streamed, WebSocket, aiohttp's own) at no cost per request; an
    ``on_response_prepare`` signal would cost a coroutine on each, and never sees the answer
    to a refused head. An upstream's own Server header still passes: it is set first.
    """
    web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]  # imported, not exported


class GatewayRequestHandler(web.RequestHandler):
    """One connection: aiohttp's protocol, with refused heads answered as ours and a
    watchdog on the client's pace."""

    __slots__ = (
        "_head_begun",
        "_head_since",
        "_owner",
        "_read_at",
        "_send_pending",
        "_send_since",
        "_socket",
        "_watchdog",
    )

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._owner = manager  # aiohttp forgets its manager at connection_lost
        self._socket: asyncio.Transport | None = None  # ours until connection_lost
        self._watchdog: asyncio.TimerHandle | None = None
        self._head_since: float | None = None  # a head is awaited and timed from then
        self._head_begun = False  # bytes of that head have come
        self._read_at = 0.0  # the last byte from the client, or reading resumed
        self._send_since: float | None = None  # writes wait for the client since then
        self._send_pending = 0  # bytes waiting for it when last looked at

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            # An exception escaped a handler (ingress lets none escape the public app's).
            return super().handle_error(request, status, exc, message)
        reason, error = classify_bad_head(exc, max_line_size=self.max_line_size)
        # SECURITY: neither the exception nor its text: it quotes the client's bytes, and a
        # traceback per request would let any client write to the log at will.
        log.warning(
            "bad_request_head",
            extra={"reason": reason, "parser_error": type(exc).__name__, "status": error.status},
        )
        metrics = self._owner.metrics
        if metrics is not None:
            metrics.observe_bad_head(reason, error.status)
        response = render_error(error)
        # The parser cannot resume mid-head. aiohttp answers as HTTP/1.0 here, for which it
        # writes no Connection header of its own.
        response.headers["Connection"] = "close"
        response.force_close()
        return response

    # -- the connection's life -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._owner.admit():
            # Beyond the cap: closed before a byte is read. Detached first, so that aiohttp's
            # connection_lost has nothing to undo.
            self._manager = None
            cast(asyncio.Transport, transport).abort()
            return
        now = self._loop.time()
        self._socket = cast(asyncio.Transport, transport)
        self._head_since = self._read_at = now
        super().connection_made(transport)
        self._watchdog = self._loop.call_at(now + self._owner.watch_period_s, self._watch)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._socket is not None:
            self._socket = None
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._owner.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:
            now = self._read_at = self._loop.time()
            if self._head_since is None and self._waiter is not None:
                self._head_since = now  # the first byte of a head after an idle spell
            self._head_begun = True
        requests = self._request_count
        super().data_received(data)
        if self._request_count != requests:  # a whole head: the request is the handler's
            self._head_since = None
            self._head_begun = False

    def resume_reading(self, resume_parser: bool = True) -> None:
        # Reading had stopped for our own flow control: the body timeout starts afresh.
        self._read_at = self._loop.time()
        super().resume_reading(resume_parser)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_since = self._loop.time()

    async def _drain_helper(self) -> None:
        # A write now waits for the client. Until it may go on, what we hold for the client
        # can only shrink, by what the client takes: that is the send timeout's progress.
        if self._socket is not None:
            self._send_pending = _unsent_bytes(self._socket)
            self._watch_by(self._loop.time() + self._owner.send_watch_s)
        await super()._drain_helper()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_since = None

    def _process_keepalive(self) -> None:
        # aiohttp's keep-alive timer, which closes a connection waiting for its next request;
        # one whose next head has begun (or a new one) is the head timeout's to judge.
        if self._head_since is not None:
            self._keepalive_handle = None
            return
        transport = self.transport
        super()._process_keepalive()
        if transport is not None and self.transport is None:
            self._count("keepalive", None)

    # -- the watchdog --------------------------------------------------------------------

    def _watch(self) -> None:
        transport = self._socket
        if transport is None:
            self._watchdog = None
            return
        limits = self._owner.limits
        now = self._loop.time()
        next_at = now + self._owner.watch_period_s
        # A client that takes none of what we write: writes wait, or a close waits to flush.
        if transport.get_write_buffer_size() and (self.writing_paused or transport.is_closing()):
            unsent = _unsent_bytes(transport)
            if self._send_since is None or unsent < self._send_pending:
                self._send_since = now  # first seen, or the client took some of it
            self._send_pending = unsent
            deadline = self._send_since + limits.send_timeout_s
            if now >= deadline:
                self._reset("send")
                return
            # Progress is seen only when looked for: often, while a write waits.
            next_at = min(next_at, deadline, now + self._owner.send_watch_s)
        waiter = self._waiter
        if self._head_since is not None and waiter is not None and not waiter.done():
            deadline = self._head_since + limits.client_header_timeout_s
            if now >= deadline:
                self._time_out_head(transport)
                return
            next_at = min(next_at, deadline)
        request = self._current_request
        if request is not None and _body_unfinished(request):
            if self._reading_paused:  # our flow control holds the client back, not itself
                self._read_at = now
            deadline = self._read_at + limits.client_body_timeout_s
            if now < deadline:
                next_at = min(next_at, deadline)
            elif request.writer.output_size:
                self._reset("body")  # the response has begun: it cannot become a 408
                return
            else:
                self._time_out_body(request)
        self._watchdog = self._loop.call_at(next_at, self._watch)

    def _watch_by(self, at: float) -> None:
        watchdog = self._watchdog
        if watchdog is not None and watchdog.when() > at:
            watchdog.cancel()
            self._watchdog = self._loop.call_at(at, self._watch)

    def _time_out_head(self, transport: asyncio.Transport) -> None:
        status = None
        if self._head_begun and not transport.get_write_buffer_size():
            # Part of a head came: say why before closing (nginx closes without a word).
            transport.write(_head_timeout_answer())
            status = RequestTimeoutError.status
        self._count("head", status)
        self._watchdog = None
        if transport.get_write_buffer_size():
            transport.abort()
        self.force_close()

    def _time_out_body(self, request: web.BaseRequest) -> None:
        self._count("body", None)  # ingress counts the 408 it answers as a request
        # Nothing more is read, and the connection closes after the answer. The handler's
        # next read of the body raises the error, whoever reads it (the upstream client's
        # body writer too), and ingress answers 408; the body's end is declared so that
        # aiohttp does not linger reading the rest.
        self.close()
        content = request.content
        content.set_exception(RequestTimeoutError())
        content.feed_eof()

    def _reset(self, kind: str) -> None:
        self._count(kind, None)
        self._watchdog = None
        transport = self._socket
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        transport.abort()
        self.force_close()

    def _count(self, kind: str, status: int | None) -> None:
        # One line per timeout, no traceback: a flood of slow clients is an attack to count,
        # not an error of ours. Idle keep-alive connections closing is routine.
        level = logging.DEBUG if kind == "keepalive" else logging.INFO
        log.log(level, "client_timeout", extra={"timeout": kind})
        metrics = self._owner.metrics
        if metrics is not None:
            metrics.observe_client_timeout(kind, status)


def _unsent_bytes(transport: asyncio.Transport) -> int:
    """What we hold for the client: the transport's buffer, and the kernel's send queue
    (Linux's SIOCOUTQ: not yet acknowledged). The kernel's can be megabytes (its buffer
    grows with the connection's speed), so a client reading slowly drains it long before
    the transport's own buffer moves."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _SIOCOUTQ is not None and sock is not None:
        with contextlib.suppress(OSError):
            queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
            unsent += int.from_bytes(queued, sys.byteorder)
    return unsent


def _body_unfinished(request: web.BaseRequest) -> bool:
    content = request.content
    return not content.is_eof() and content.exception() is None


def _head_timeout_answer() -> bytes:
    """A 408 in our JSON shape, written straight to a connection that has no request."""
    error = RequestTimeoutError("the request head was not received in time")
    body = json.dumps(error.body()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Server: {SERVER_NAME}\r\n\r\n"
    )
    return head.encode("ascii") + body


class GatewayServer(web.Server):
    """aiohttp's low-level server whose connections are ``GatewayRequestHandler``s, at most
    ``max_connections`` of them open (``None``: no cap)."""

    def __init__(
        self,
        handler: _Handler,
        *,
        limits: LimitsSettings,
        max_connections: int | None = None,
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **{**kwargs, "keepalive_timeout": limits.keepalive_timeout_s})
        self.limits = limits
        self.metrics = metrics
        # Every deadline is at least this far from the event that set it, so a watchdog
        # that fires this often, or at the nearest deadline it knows, is never late.
        self.watch_period_s = min(
            limits.client_header_timeout_s, limits.client_body_timeout_s, limits.send_timeout_s
        )
        # While a write waits, how often the client's progress is looked at: the send
        # timeout fires at most this much late.
        self.send_watch_s = limits.send_timeout_s / 4
        self._max_connections = max_connections
        self._open = 0
        self._full = False
        hide_server_banner()

    def __call__(self) -> GatewayRequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)

    def admit(self) -> bool:
        """Count a new connection in, or refuse it at the cap."""
        if self._max_connections is not None and self._open >= self._max_connections:
            if not self._full:
                self._full = True
                log.warning("connection_limit_reached", extra={"limit": self._max_connections})
            if self.metrics is not None:
                self.metrics.connections_refused_total.inc()
            return False
        self._open += 1
        if self.metrics is not None:
            self.metrics.open_connections.inc()
        return True

    def release(self) -> None:
        self._open -= 1
        self._full = False
        if self.metrics is not None:
            self.metrics.open_connections.dec()


def _answering_as_ours(handler: _Handler) -> _Handler:
    """``handler`` (an app's), with what aiohttp's router answers by itself made ours: a
    target no resource can match even in principle (``CONNECT host:443`` has no path, so
    aiohttp's lookup never starts) gets its 404 as our JSON, never aiohttp's text."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            error = _ROUTER_ERRORS.get(exc.status, BadRequestError)()
            return render_error(error)

    return handle


_ROUTER_ERRORS: dict[int, type[GatewayError]] = {
    404: NotFoundError,
    405: MethodNotAllowedError,
}


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving its app through a ``GatewayServer``; refused heads,
    timeouts and connections are counted in ``metrics`` when given. ``entry``, when given,
    is the handler every request goes to in place of the app's router (the public app's,
    ``app.ENTRY``); its app's startup and cleanup still run."""

    __slots__ = ("_entry", "_limits", "_max_connections", "_metrics")

    def __init__(
        self,
        app: web.Application,
        *,
        limits: LimitsSettings,
        max_connections: int | None = None,
        metrics: Metrics | None = None,
        entry: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._entry = entry
        self._limits = limits
        self._max_connections = max_connections
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        # AppRunner starts the app and builds aiohttp's server for it, with the runner's
        # arguments and the app's handler_args merged; ours takes all of them over.
        server = await super()._make_server()
        # ``entry``: the app's one handler, called without aiohttp's router.
        # The app's request factory makes every request a ``web.Request``.
        handler = (
            _answering_as_ours(server.request_handler)
            if self._entry is None
            else cast(_Handler, self._entry)
        )
        return GatewayServer(
            handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            limits=self._limits,
            max_connections=self._max_connections,
            metrics=self._metrics,
            **server._kwargs,
        )
