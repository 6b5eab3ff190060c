"""The one place that knows the order: route, authenticate, forward.

A reader follows a request from here to the upstream call without jumping around:
``routing`` picks the route, ``auth`` names the principal, ``upstream`` forwards, and on an
upstream 401 for a session request the session's token is refreshed (at most once per
``refresh.forced_min_interval_s``, ``sessions.refresh`` decides) and the request replayed
once, when its method is idempotent or its route allows more, and its body was buffered.
"""

from __future__ import annotations

import functools

from aiohttp import web

from gateway.auth import Authenticator
from gateway.bff.capture import TokenCapture
from gateway.context import current
from gateway.routing import Route, RouteTable, encode_path
from gateway.upstream import Upstream
from gateway.websocket import forward_websocket, is_websocket_upgrade

# RFC 9110 §9.2.2: the idempotent methods. Sent twice they mean what they mean once, which
# is why a client may repeat them on its own; PUT and DELETE are among them, so a save or a
# delete whose 401 led to a new token goes through, as the SPA meant it to.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


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

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        """Forward ``request``, whose target's path is ``path`` (``routing.parse_path``'s)."""
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
            ended = (
                None if principal is None else functools.partial(self._auth.wait_ended, principal)
            )
            return await forward_websocket(
                request, route, self._upstream, headers, upstream_path, ended
            )
        body = await self._upstream.read_body(request, route)
        response = await self._upstream.open(request, route, headers, body, upstream_path)
        if route.capture is not None and self._capture is not None:
            # A login API: its reply's tokens become a session and never reach the browser.
            return await self._capture.relay(request, route, response, route.capture)
        if response.status == 401 and principal is not None:
            # The upstream refused our session's token (revoked, or expired early): a new
            # one, unless a refresh obtained this one moments ago (``sessions.refresh``).
            # The request is replayed once, never twice (the second answer is the answer),
            # and only where a repeat cannot do harm. SECURITY: a POST the upstream acted on
            # before it answered 401 must not be done twice; its 401 goes back, and the
            # client's own retry carries the new token.
            renewed = await self._auth.after_upstream_rejection(principal)
            if renewed is not None and body.replayable and self._replays(request.method, route):
                response.release()
                headers.set("Authorization", f"Bearer {renewed.access_token}")
                response = await self._upstream.open(request, route, headers, body, upstream_path)
        return await self._upstream.relay(request, response)

    def _replays(self, method: str, route: Route) -> bool:
        return method in IDEMPOTENT_METHODS or route.replay_non_idempotent
