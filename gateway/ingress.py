"""What wraps every request: request id, header limits, metrics, the access line, errors.

This is the one place errors become responses: a ``GatewayError`` renders as its JSON
body and headers, aiohttp's own HTTP exceptions are mapped to ours, and anything else is
a logged ``internal_error`` 500 without a trace in the response. Everything between
(routing, authentication, forwarding) is ``proxy``'s; a head aiohttp's parser refuses never
gets here, and ``http_server`` answers it with ``render_error``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, web

from gateway.context import RequestContext, open_context
from gateway.errors import (
    BadRequestError,
    ExpectationFailedError,
    GatewayError,
    HeadersTooLargeError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
)
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.settings import LimitsSettings, LogSettings
from gateway.tracing import RequestTrace, Tracing

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAPPED_HTTP: dict[int, type[GatewayError]] = {
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: PayloadTooLargeError,
    431: HeadersTooLargeError,
}


def render_error(exc: GatewayError) -> web.Response:
    response = web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    response.headers["Cache-Control"] = "no-store"
    return response


async def expect_continue(request: web.BaseRequest) -> web.StreamResponse | None:
    """Every route's ``Expect`` handler (RFC 9110 §10.1.1), in place of aiohttp's, which
    answers any other expectation with a text 417 quoting it (and a 500 when it cannot be
    encoded): ``100-continue`` is answered at once, anything else is our JSON 417."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no expectations to meet
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not the response's body
        return None
    return render_error(ExpectationFailedError())


def aiohttp_parser_limits(limits: LimitsSettings) -> dict[str, Any]:
    """aiohttp's request parser settings, the servers' ``handler_args``.

    Header fields and their number may reach twice ours, so ``check_headers`` answers 431
    first; past that the parser refuses the head, and ``http_server`` answers 431 too. The
    request target is held to ``max_header_bytes`` (``http_server`` answers 414): the two
    line limits differ, which is how ``http_server`` tells which one a refused line crossed.
    """
    return {
        "max_line_size": limits.max_header_bytes,
        "max_field_size": limits.max_header_bytes * 2,
        "max_headers": limits.max_headers * 2,
        # SECURITY: a proxy forwards a body as sent. Decoded here, a gzip body would reach
        # the upstream decoded but still labelled gzip, expand in our memory, and fail our
        # Content-Length read with a 500.
        "auto_decompress": False,
    }


class Ingress:
    def __init__(
        self,
        limits: LimitsSettings,
        log_settings: LogSettings,
        metrics: Metrics,
        access: AccessLog,
        tracing: Tracing,
    ) -> None:
        self._tracing = tracing
        self._limits = limits
        self._log = log_settings
        self._metrics = metrics
        self._access = access
        # Request ids: a random per-process prefix and a counter, unique without urandom
        # and uuid objects per request.
        self._id_prefix = os.urandom(6).hex()
        self._id_counter = itertools.count(1)

    def request_id(self, offered: str | None) -> str:
        # A client's id is kept only when it is short and plain: it lands in every log line.
        if offered is not None and _REQUEST_ID.fullmatch(offered):
            return offered
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    def check_headers(self, request: web.Request) -> None:
        limits = self._limits
        raw = request.raw_headers
        if len(raw) > limits.max_headers:
            raise HeadersTooLargeError(f"more than {limits.max_headers} header fields")
        total = 0
        for name, value in raw:
            size = len(name) + len(value)
            if size > limits.max_header_bytes:
                raise HeadersTooLargeError(
                    f"a header field exceeds {limits.max_header_bytes} bytes"
                )
            total += size
        if total > limits.max_headers_total_bytes:
            raise HeadersTooLargeError("the header section is too large")

    def wrap(self, handler: Handler, *, expect: bool = False) -> Handler:
        """``handler`` behind the ingress. Every route's handler is registered wrapped, not
        behind an aiohttp middleware: the middleware machinery costs more per request than
        all the ingress does (about 5 µs of a 140 µs request). ``expect``: the ``Expect``
        header is answered here first (``expect_continue``), as aiohttp's router does before
        a route's handler; for the server's direct entry, which has no router
        (``app.ENTRY``)."""

        async def ingress(request: web.Request) -> web.StreamResponse:
            headers = request.headers
            if expect and headers.get("Expect"):
                answer = await expect_continue(request)
                await request.writer.drain()
                if answer is not None:
                    return answer
            ctx = open_context(self.request_id(headers.get("X-Request-Id")))
            traced = self._tracing.start(headers, request.method)
            ctx.trace = traced.ids
            started = time.perf_counter()
            try:
                self.check_headers(request)
                response = await handler(request)
            except GatewayError as exc:
                ctx.outcome = exc.code
                response = render_error(exc)
            except web.HTTPException as exc:
                error = _MAPPED_HTTP.get(exc.status, BadRequestError)()
                ctx.outcome = error.code
                response = render_error(error)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unhandled_error")
                ctx.outcome = "internal_error"
                response = render_error(GatewayError())
            if not response.prepared:
                response.headers["X-Request-Id"] = ctx.request_id
            self._observe(request, response, ctx, time.perf_counter() - started, traced)
            return response

        return ingress

    def _observe(
        self,
        request: web.Request,
        response: web.StreamResponse,
        ctx: RequestContext,
        elapsed_s: float,
        traced: RequestTrace,
    ) -> None:
        method = request.method
        status = response.status
        span = traced.span
        exemplar = None
        if span is not None:
            sampled = span.is_recording()  # asked before finish: an ended span records no more
            traced.finish(
                method=method,
                route=ctx.route,
                status=status,
                outcome=ctx.outcome,
                auth=ctx.auth_mode,
            )
            if sampled and traced.ids is not None:  # a latency panel links to its trace
                exemplar = traced.ids.trace_id_hex
        self._metrics.observe_request(
            ctx.route, method if method in _METHODS else "other", status, elapsed_s, exemplar
        )  # a bounded method label
        if not self._log.access_log:
            return
        path = ctx.path or request.raw_path.partition("?")[0]
        if self._log.log_query_string and request.query_string:
            path = f"{path}?{request.query_string}"
        self._access.write(ctx, method, path, status, elapsed_s)
