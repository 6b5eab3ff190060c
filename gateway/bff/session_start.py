"""Starting a session, written once for both ways a login ends: the OIDC callback
(``bff.login``) and a captured login reply (``bff.capture``).

The browser's previous session ends first (a login always starts afresh: no session
fixation), then a new 256-bit secret is minted, the session created under the handle it
derives, counted, and the cookie set on the response. What a session holds is the
caller's; how it is stored, ``sessions``'s.
"""

from __future__ import annotations

from aiohttp import web

from gateway.metrics import Metrics
from gateway.sessions.cookie import SessionCookies, new_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session, SessionStore


class SessionStarter:
    """Borrows the store, the cookies and the metrics of the login endpoints."""

    __slots__ = ("_cookies", "_metrics", "_store")

    def __init__(self, store: SessionStore, cookies: SessionCookies, metrics: Metrics) -> None:
        self._store = store
        self._cookies = cookies
        self._metrics = metrics

    async def start(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> Session:
        """Replace the request's session (if any) by ``session``; the cookie goes on
        ``response``. Returns the session as stored."""
        previous = self._cookies.session_handle(request)
        if previous is not None:
            await self._store.delete(previous)  # SECURITY: no fixation
        secret = new_secret()
        stored = await self._store.create(derive_handle(secret), session)
        self._metrics.sessions_created_total.inc()
        self._cookies.set_session(response, secret)
        return stored
