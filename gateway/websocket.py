"""WebSocket proxying for routes that allow it: after authentication, pump frames both ways.

The upgrade is checked and the upstream connection opened before we answer the client's
handshake, so an unreachable upstream is still a clean 502 JSON. Authentication happened
before this module is called (``proxy``); header filtering is ``upstream``'s.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import UpstreamTimeoutError, UpstreamUnavailableError
from gateway.ingress import set_request_id_header
from gateway.routing import Route
from gateway.upstream import Upstream

# The handshake is re-done by aiohttp's client; these belong to the client's own handshake.
_HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)


def is_websocket_upgrade(request: web.Request) -> bool:
    connection = request.headers.get("Connection", "").lower()
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in (t.strip() for t in connection.split(","))
    )


async def forward_websocket(
    request: web.Request,
    route: Route,
    upstream: Upstream,
    headers: CIMultiDict[str],
    path: str,
) -> web.WebSocketResponse:
    scheme = "wss" if route.upstream.scheme == "https" else "ws"
    url = (
        route.upstream.with_scheme(scheme)
        .with_path(path, encoded=True)
        .with_query(request.query_string)
    )
    protocols = tuple(
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    )
    for name in _HANDSHAKE:
        headers.popall(name, None)
    try:
        remote = await upstream.http.ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            timeout=aiohttp.ClientWSTimeout(ws_close=10.0),
            autoping=True,
        )
    except TimeoutError as exc:
        raise UpstreamTimeoutError() from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailableError() from exc
    client = web.WebSocketResponse(protocols=(remote.protocol,) if remote.protocol else ())
    set_request_id_header(client)
    try:
        await client.prepare(request)
        await _pump_both(client, remote)
    finally:
        await remote.close()
        await client.close()
    return client


async def _pump_both(
    client: web.WebSocketResponse, remote: aiohttp.ClientWebSocketResponse
) -> None:
    to_remote = asyncio.create_task(_pump(client, remote))
    to_client = asyncio.create_task(_pump(remote, client))
    try:
        await asyncio.wait((to_remote, to_client), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_remote, to_client):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            break
