"""The one place that knows the order: route, authenticate, forward.

A reader follows a request from here to the upstream call without jumping around:
``routing`` picks the route, ``auth`` names the principal, ``upstream`` forwards, and on an
upstream 401 for a session request the session's token is refreshed once and the request
replayed once (when its body can be replayed).
"""

from __future__ import annotations

from aiohttp import web

from gateway.auth import Authenticator
from gateway.context import current
from gateway.routing import RouteTable, encode_path, parse_path
from gateway.sessions.capture import TokenCapture
from gateway.upstream import Upstream
from gateway.websocket import forward_websocket, is_websocket_upgrade


class Proxy:
    def __init__(
        self,
        routes: RouteTable,
        auth: Authenticator,
        upstream: Upstream,
        capture: TokenCapture | None = None,
    ) -> None:
        if capture is None and any(route.capture is not None for route in routes):
            raise ValueError("capture_tokens routes need a TokenCapture")  # or tokens leak
        self._routes = routes
        self._auth = auth
        self._upstream = upstream
        self._capture = capture

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = parse_path(request.raw_path.partition("?")[0])
        route = self._routes.match(path)
        ctx = current()
        if ctx is not None:
            ctx.route = route.name
            ctx.path = path
            ctx.auth_mode = route.auth
        principal = await self._auth.authenticate(request, route)
        upstream_path = encode_path(route.upstream_path(path))
        headers = self._upstream.build_headers(request, route, principal)
        if route.capture is not None and self._capture is not None:
            self._capture.prepare(request, headers)  # CSRF check; an unencoded reply
        if route.websocket and is_websocket_upgrade(request):
            return await forward_websocket(request, route, self._upstream, headers, upstream_path)
        body = await self._upstream.read_body(request, route)
        response = await self._upstream.open(request, route, headers, body, upstream_path)
        if route.capture is not None and self._capture is not None:
            # A login API: its reply's tokens become a session and never reach the browser.
            return await self._capture.relay(request, route, response, route.capture)
        if response.status == 401 and principal is not None and body.replayable:
            # The upstream refused our session's token (revoked, or expired early): refresh
            # once and replay once. Never twice: the second answer is the answer.
            renewed = await self._auth.after_upstream_rejection(principal)
            if renewed is not None:
                response.release()
                headers["Authorization"] = f"Bearer {renewed.access_token}"
                response = await self._upstream.open(request, route, headers, body, upstream_path)
        return await self._upstream.relay(request, response)
