"""WebSocket proxying for routes that allow it: after authentication, pump frames both ways.

The upgrade is checked and the upstream connection opened before we answer the client's
handshake, so an unreachable upstream is still a clean 502 JSON. The socket lives only as
long as its principal: when ``ended`` returns (the session ended on any replica, or the
Bearer token expired) both sides are closed with 1008. Authentication, and knowing when
it ends, is ``auth``'s (called by ``proxy``); header filtering is ``upstream``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from gateway.context import set_request_id_header
from gateway.errors import UpstreamTimeoutError, UpstreamUnavailableError
from gateway.routing import Route
from gateway.upstream import Upstream, UpstreamHeaders

log = logging.getLogger(__name__)

_ENDED = b"authentication ended"  # the close frame's reason: a session ended, a token expired

# The handshake is re-done by aiohttp's client; these belong to the client's own handshake.
_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
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
    headers: UpstreamHeaders,
    path: str,
    ended: Callable[[], Coroutine[Any, Any, None]] | None = None,
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
    # aiohttp's client takes ``str`` pairs; ours decoded as aiohttp decodes a request's.
    sent = [(name, value) for name, value in headers.items() if name.lower() not in _HANDSHAKE]
    try:
        remote = await upstream.http.ws_connect(
            url,
            headers=sent,
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
        if await _pump_both(client, remote, ended):
            # SECURITY: the principal no longer stands (logout, back-channel logout, expiry):
            # no frame may pass on its credential. 1008 is "policy violation" (RFC 6455
            # §7.4.1): the client should not reconnect with what it has.
            code = aiohttp.WSCloseCode.POLICY_VIOLATION
            log.info("websocket_closed", extra={"close_code": int(code), "reason": "ended"})
            await asyncio.gather(
                remote.close(code=code, message=_ENDED), client.close(code=code, message=_ENDED)
            )
    finally:
        await remote.close()
        await client.close()
    return client


async def _pump_both(
    client: web.WebSocketResponse,
    remote: aiohttp.ClientWebSocketResponse,
    ended: Callable[[], Coroutine[Any, Any, None]] | None,
) -> bool:
    """Relay until either side closes (False) or ``ended`` returns (True)."""
    tasks = [asyncio.create_task(_pump(client, remote)), asyncio.create_task(_pump(remote, client))]
    pumps = tuple(tasks)
    watch = None
    if ended is not None:
        watch = asyncio.create_task(ended(), name="websocket-principal-watch")
        tasks.append(watch)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if watch is not None:
            await asyncio.gather(watch, return_exceptions=True)  # its outcome is read below
    if watch is None or watch not in done:
        return False
    error = watch.exception()
    if error is not None:
        # Its principal can no longer be vouched for: closed all the same, and said why.
        log.error("websocket_watch_failed", exc_info=error)
    return True


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
