"""Authentication: which principal a request acts for, by the route's auth mode.

``bearer`` validates the ``Authorization`` header (RFC 6750 §2.1 only: never a query or
form parameter). ``session`` modes defer to the session authenticator, where a valid
Bearer header still wins. Required scopes are checked here, for both; and here a
connection that outlives its request learns when its principal stops standing
(``wait_ended``). Token cryptography is ``tokens``'s job; cookies, CSRF and refresh are
``sessions``'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from gateway.context import current
from gateway.errors import (
    AuthenticationRequiredError,
    BadRequestError,
    InsufficientScopeError,
)
from gateway.principal import Principal
from gateway.routing import Route
from gateway.sessions.model import SessionHandle
from gateway.tokens.validator import TokenValidator


class SessionAuthenticator(Protocol):
    async def authenticate(self, request: web.Request, route: Route) -> Principal: ...

    async def after_upstream_rejection(self, principal: Principal) -> Principal | None: ...

    async def wait_ended(self, handle: SessionHandle) -> None: ...


def parse_bearer(request: web.Request) -> str | None:
    """The Bearer token of the request, None when there is none, 400 for two headers.

    Its syntax is the validator's to judge, on a cache miss: a compact JWS (three base64url
    segments) is stricter than RFC 6750's b64token, and a token in the verified-token cache
    passed that check already, so a cached token costs no pattern match over its bytes."""
    values = request.headers.getall("Authorization", ())
    if not values:
        return None
    if len(values) > 1:
        raise BadRequestError("more than one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme is no Bearer credential (RFC 6750 §3.1)
    return token.strip()


class Authenticator:
    def __init__(
        self,
        validator: TokenValidator | None,
        sessions: SessionAuthenticator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._validator = validator
        self._sessions = sessions
        self._clock = clock

    async def authenticate(self, request: web.Request, route: Route) -> Principal | None:
        mode = route.auth
        if mode == "none":
            return None
        token = parse_bearer(request)
        if token is not None and self._validator is not None:
            principal = await self._validator.validate(token)
        elif mode == "bearer" or self._sessions is None:
            raise AuthenticationRequiredError("a Bearer access token is required")
        else:
            principal = await self._sessions.authenticate(request, route)
        if not route.scopes <= principal.scopes:
            raise InsufficientScopeError(tuple(sorted(route.scopes)))
        ctx = current()
        if ctx is not None:
            ctx.auth_mode = principal.via
            ctx.subject = principal.subject
        return principal

    async def after_upstream_rejection(self, principal: Principal) -> Principal | None:
        """A fresher principal to replay with after an upstream 401, or None."""
        if principal.via != "session" or self._sessions is None:
            return None
        return await self._sessions.after_upstream_rejection(principal)

    async def wait_ended(self, principal: Principal) -> None:
        """Return when ``principal`` stops standing: its session ended (on any replica), or
        its Bearer token expired. For connections that outlive their request (WebSockets)."""
        if principal.handle is not None and self._sessions is not None:
            await self._sessions.wait_ended(principal.handle)
            return
        # A Bearer token cannot be revoked here (no introspection): it ends at its exp.
        await asyncio.sleep(max(principal.expires_at - self._clock(), 0.0))
