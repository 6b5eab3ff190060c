"""A fake upstream: records what reached it, echoes, streams, stalls and speaks WebSocket.

Tests count requests here, where they arrive, to prove a rejected request never did.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDict


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body_bytes: int


@dataclass
class FakeUpstream:
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    status_for: dict[str, int] = field(default_factory=dict)
    rejected_tokens: set[str] = field(default_factory=set)  # answered 401, as if revoked
    reject_every_token: bool = False

    def web_app(self) -> web.Application:
        async def echo(request: web.Request) -> web.StreamResponse:
            if request.path.startswith("/ws"):
                return await self._websocket(request)
            received = 0
            async for chunk in request.content.iter_any():
                received += len(chunk)
            self.seen.append(
                Seen(request.method, request.raw_path, CIMultiDict(request.headers), received)
            )
            self.arrived.set()
            if request.path.startswith("/slow"):
                await self.release.wait()
            if "/download/" in request.path:
                return await self._download(request, int(request.path.rsplit("/", 1)[1]))
            body: dict[str, Any] = {
                "path": request.raw_path,
                "method": request.method,
                "body_bytes": received,
            }
            status = self.status_for.get(request.path, 200)
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.reject_every_token or token in self.rejected_tokens:
                status = 401
            response = web.json_response(body, status=status)
            response.headers["Connection"] = "keep-alive, X-Upstream-Hop"
            response.headers["X-Upstream-Hop"] = "secret-hop"
            response.headers["Keep-Alive"] = "timeout=5"
            if request.path.startswith("/setcookie"):
                response.set_cookie("__Host-tokengate", "planted", path="/", secure=True)
                response.set_cookie("app", "1")
                # Not a cookie, though it reads like ours: relayed as any header is.
                response.headers["X-Note"] = "__Host-tokengate=is-our-cookie-name"
            return response

        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", echo)
        return app

    async def _download(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            part = chunk[: min(len(chunk), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(Seen("WS", request.raw_path, CIMultiDict(request.headers), 0))
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"echo:{message.data}")
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws


class CannedReply:
    """An upstream's answer already read off the wire, as ``upstream.UpstreamReply``; whether
    its reader released or closed it."""

    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes = b"hello"
    ) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self.body = body
        self.content_length: int | None = len(body)
        self.released = self.closed = False

    async def read(self) -> bytes:
        self.released = True
        return self.body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self.body
        self.released = True

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True
