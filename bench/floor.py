"""The floor: the least a reverse proxy on aiohttp's server does (uvloop, one pooled
upstream client, the body streamed back, hop-by-hop headers dropped).

``python bench/floor.py --port N --upstream http://127.0.0.1:M [--client aiohttp|http1]``.
No auth, no metrics, no logs. ``--client`` is the upstream client: ``aiohttp`` (the
default, aiohttp's ``ClientSession``: the ``floor`` row) or ``http1`` (tokengate's own
``gateway.http1.Http1Pool``, raw header bytes through: the ``floor-http1`` row), or
``static``: no upstream at all, the bodies answered from memory (the ``aio-static`` row,
aiohttp's server alone); or ``raw``: the same bodies from a bare ``httptools`` protocol on
uvloop, no aiohttp at all (the ``raw-static`` row: what a server that only parses and
answers costs, to weigh aiohttp's own share of ``aio-static``).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from procs import LOOPBACK, serve_on_loopback

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Request headers the http1 floor drops: a Content-Length stays, so a body streams as is.
HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP - {"content-length"})


def build_aiohttp_proxy(upstream: str) -> web.Application:
    """The floor on aiohttp's ``ClientSession`` (``upstream``: ``http://host:port``)."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(
            upstream, connector=aiohttp.TCPConnector(limit=1024), auto_decompress=False
        )
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = request.content if request.body_exists else None
        async with request.app[session_key].request(
            request.method, request.raw_path, headers=headers, data=body, allow_redirects=False
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason
            )
            response.headers.extend(
                (k, v) for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP
            )
            response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    return _app(client, handle)


def build_http1_proxy(upstream: str) -> web.Application:
    """The floor on tokengate's ``Http1Pool`` (imported here: the aiohttp floor's process
    does not load ``gateway``)."""
    from gateway.http1 import Http1Pool

    parts = urlsplit(upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    pool_key = web.AppKey("pool", Http1Pool)

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[pool_key] = Http1Pool(limit_per_host=1024)
        yield
        await app[pool_key].aclose()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.raw_headers if k.lower() not in HOP_BY_HOP_BYTES]
        body = request.content.iter_any() if request.body_exists else None
        upstream_response = await request.app[pool_key].request(
            request.method,
            host,
            port,
            request.raw_path.encode("utf-8", "surrogateescape"),
            headers,
            body,
            connect_timeout_s=5.0,
            read_timeout_s=30.0,
        )
        async with upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason
            )
            response.headers.extend(
                (k, v) for k, v in upstream_response.headers if k.lower() not in HOP_BY_HOP
            )
            response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.iter_chunks():
                await response.write(chunk)
            await response.write_eof()
            return response

    return _app(client, handle)


def build_static(upstream: str) -> web.Application:
    """aiohttp's server alone (the ``aio-static`` row): the origin's bodies answered from
    memory, no upstream (``upstream`` is ignored). What every aiohttp proxy pays before it
    does anything: parsing, the request object, the router, the task, the response."""
    from nginx import BODIES, body_of

    bodies = {f"/{name}": body_of(size) for name, size in BODIES.items()}

    async def nothing(app: web.Application) -> AsyncIterator[None]:
        yield

    async def handle(request: web.Request) -> web.StreamResponse:
        body = bodies.get(request.path)
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="application/octet-stream")

    return _app(nothing, handle)


def serve_raw_static(port: int) -> None:
    """The ``raw-static`` row: the origin's bodies from a bare ``httptools`` request parser
    on uvloop, answered in a task per request as a server does. No limits, no timeouts, no
    request object: a measurement of the least an asyncio HTTP/1.1 server in Python costs,
    not a server to run."""
    import asyncio
    import signal
    from email.utils import formatdate

    import httptools
    import uvloop
    from nginx import BODIES, body_of

    answers = {
        f"/{name}".encode(): (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n" % size,
            body_of(size),
        )
        for name, size in BODIES.items()
    }
    not_found = (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n", b"")

    class Connection(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.transport is not None:
                    self.transport.close()

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            url, self.url = self.url, b""
            keep_alive = self.parser.should_keep_alive()
            asyncio.get_running_loop().create_task(self.answer(url, keep_alive))

        async def answer(self, url: bytes, keep_alive: bool) -> None:
            head, body = answers.get(url.partition(b"?")[0], not_found)
            date = formatdate(usegmt=True).encode()
            if self.transport is not None:
                self.transport.write(head + b"Date: " + date + b"\r\nServer: raw\r\n\r\n" + body)
                if not keep_alive:
                    self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set_result, None)
        server = await loop.create_server(Connection, LOOPBACK, port, backlog=1024)
        await stop
        server.close()

    uvloop.run(main())


def _app(
    client: Callable[[web.Application], AsyncIterator[None]],
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


BUILDERS: dict[str, Callable[[str], web.Application]] = {
    "aiohttp": build_aiohttp_proxy,
    "http1": build_http1_proxy,
    "static": build_static,
}
CLIENTS = (*BUILDERS, "raw")


def serve(client: str, port: int, upstream: str) -> None:
    if client == "raw":
        serve_raw_static(port)
        return
    serve_on_loopback(BUILDERS[client](upstream), port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    args = parser.parse_args()
    serve(args.client, args.port, args.upstream)


if __name__ == "__main__":
    main()
