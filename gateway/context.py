"""The per-request context every log line and metric of a request reads.

``ingress`` opens it; ``proxy``, ``auth`` and ``upstream`` fill in what they learn (route,
auth mode, a hash of the subject, upstream time). It travels in a ``contextvars`` variable,
so nothing passes it by hand and a background task never sees a request's context.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from aiohttp import web

from gateway.tracing import TraceIds

_current: ContextVar[RequestContext | None] = ContextVar("tokengate_request", default=None)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    route: str = "-"
    path: str | None = None  # normalised, once routing has run
    auth_mode: str = "-"
    subject: str | None = None
    upstream_s: float | None = None
    outcome: str = "ok"
    trace: TraceIds | None = None  # the request's place in its trace (``tracing``)


def current() -> RequestContext | None:
    return _current.get()


def open_context(request_id: str) -> RequestContext:
    ctx = RequestContext(request_id=request_id)
    _current.set(ctx)  # aiohttp runs each request in its own task, hence its own context
    return ctx


def set_request_id_header(response: web.StreamResponse) -> None:
    """Every response carries its request id. Responses a handler streams itself (relayed
    bodies, WebSockets) call this before ``prepare``; ``ingress`` does it for the rest
    (cheaper than an ``on_response_prepare`` signal on every response)."""
    ctx = current()
    if ctx is not None:
        response.headers["X-Request-Id"] = ctx.request_id
