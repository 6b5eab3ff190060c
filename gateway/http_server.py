"""The HTTP/1.1 server under the public and admin apps: aiohttp's, answering as ours.

A request head aiohttp's parser refuses (a line over its limits, too many fields, bad
framing, a bad method or character) never reaches a handler: aiohttp answers it with a
plain-text 400 quoting the offending bytes and logs a traceback at ERROR. Here it gets our
JSON 431, 414 or 400 in fixed words, one WARNING ``bad_request_head`` line and a count. No
response names Python's and aiohttp's versions. A head that parses is ``ingress``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_response
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from gateway.errors import (
    BadRequestError,
    GatewayError,
    HeadersTooLargeError,
    MethodNotAllowedError,
    NotFoundError,
    URITooLongError,
)
from gateway.ingress import render_error
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

SERVER_NAME = "tokengate"
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# aiohttp raises a bare BadHttpMessage for too many header fields, from both its parsers:
# this text of theirs is all that tells it apart (a test pins it).
_TOO_MANY_HEADERS = "Too many headers received"


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
    """One connection: aiohttp's protocol, but a refused head is answered as ours."""

    __slots__ = ("_metrics",)

    def __init__(self, manager: web.Server, *, metrics: Metrics | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._metrics = metrics

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
        if self._metrics is not None:
            self._metrics.observe_bad_head(reason, error.status)
        response = render_error(error)
        # The parser cannot resume mid-head. aiohttp answers as HTTP/1.0 here, for which it
        # writes no Connection header of its own.
        response.headers["Connection"] = "close"
        response.force_close()
        return response


class GatewayServer(web.Server):
    """aiohttp's low-level server whose connections are ``GatewayRequestHandler``s."""

    def __init__(self, handler: _Handler, *, metrics: Metrics | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = metrics
        hide_server_banner()

    def __call__(self) -> GatewayRequestHandler:
        return GatewayRequestHandler(self, metrics=self._metrics, loop=self._loop, **self._kwargs)


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
    """``web.AppRunner`` serving its app through a ``GatewayServer``; refused heads are
    counted in ``metrics`` when given."""

    __slots__ = ("_metrics",)

    def __init__(
        self, app: web.Application, *, metrics: Metrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        # AppRunner starts the app and builds aiohttp's server for it, with the runner's
        # arguments and the app's handler_args merged; ours takes all of them over.
        server = await super()._make_server()
        return GatewayServer(
            _answering_as_ours(server.request_handler),
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            metrics=self._metrics,
            **server._kwargs,
        )
