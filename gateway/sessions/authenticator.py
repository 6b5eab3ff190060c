"""Session authentication for ``session`` routes: cookie, CSRF, load, fresh access token.

Returns the same ``Principal`` a Bearer token would, carrying the session's access token,
so ``upstream`` forwards both alike, and tells a connection that outlives its request (a
WebSocket) when its session ends. The refresh itself is ``sessions.refresh``'s; where the
cookie's secret leads is ``sessions.cookie`` and ``sessions.crypto``'s.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web

from gateway.errors import (
    AuthenticationRequiredError,
    CsrfError,
    SessionExpiredError,
    SessionStoreUnavailableError,
)
from gateway.principal import Principal
from gateway.routing import Route
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.model import Session, SessionHandle, SessionStore
from gateway.sessions.refresh import Refresher
from gateway.settings import CsrfSettings

# A watched session is loaded again this often while the store tells of its writes and ends
# (``SessionStore.watch``): that catches what bypasses the feed (a key deleted by hand or
# evicted, an idle expiry) and, being a load, keeps the session of an open WebSocket from
# idling out (30 s is half the shortest idle timeout settings allow).
_RECHECK_S = 30.0
# Without that news (the feed down, local_cache_s 0, Cluster), this often: a logout reaches
# an open WebSocket within 5 s at the cost of one Redis read per socket per 5 s.
_POLL_S = 5.0
_JITTER = 0.2  # up to 20 % sooner, so that sockets woken together do not poll together


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class SessionAuthenticator:
    def __init__(
        self,
        cookies: SessionCookies,
        store: SessionStore,
        refresher: Refresher,
        csrf: CsrfSettings,
        public_url: str,
        *,
        principals_kept: int,
        absolute_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cookies = cookies
        self._store = store
        self._refresher = refresher
        self._absolute_timeout_s = absolute_timeout_s
        self._clock = clock
        self._csrf_header = csrf.header
        self._origin = origin_of(public_url)
        self._login_url = f"{public_url}/auth/login"
        # The principal of each session as last loaded, by storage id: a cached session is
        # the same object on every request until it changes, and so is its principal.
        # Bounded: cleared when it holds ``principals_kept``.
        self._principals: dict[str, tuple[Session, Principal]] = {}
        self._principals_kept = principals_kept

    def check_csrf(self, request: web.Request) -> None:
        """Cookie-authenticated requests must carry our custom header (a cross-site page
        cannot add one without a CORS preflight we never grant) and no foreign Origin.

        A WebSocket handshake cannot carry a custom header from a browser, but browsers
        always send its Origin, which no page can choose: there, our Origin is required
        instead (cross-site WebSocket hijacking, RFC 6455 §10.2)."""
        headers = request.headers
        if headers.get("Upgrade", "").lower() == "websocket" and not headers.get(self._csrf_header):
            origin = headers.get("Origin")
            if origin is None:
                raise CsrfError("a cookie-authenticated WebSocket must come from our Origin")
            self.check_csrf_origin(origin)
            return
        if not headers.get(self._csrf_header):
            raise CsrfError(
                f"cookie-authenticated requests must send the {self._csrf_header} header"
            )
        origin = request.headers.get("Origin")
        if origin is not None:
            self.check_csrf_origin(origin)

    def check_csrf_origin(self, origin: str) -> None:
        if origin.lower() != self._origin:
            raise CsrfError("the request's Origin is not ours")

    async def load(self, request: web.Request) -> tuple[SessionHandle, Session] | None:
        """The request's session, or None when it has no (live) session cookie."""
        value = self._cookies.session_value(request)
        handle = None if value is None else self._cookies.handle_of(value)
        if handle is None:
            return None
        with self._store.deadline():
            session = await self._load(handle)
        return None if session is None else (handle, session)

    async def _load(self, handle: SessionHandle) -> Session | None:
        session = await self._load_or_held(handle, cached=True)
        if session is None:
            self._principals.pop(handle.storage_id, None)
        return session

    async def _load_or_held(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        try:
            return await self._store.load(handle, cached=cached)
        except SessionStoreUnavailableError:
            # A refresh whose write waits for the store (a failover) holds the session's
            # only valid tokens: serve them; the store, once back, gets them too.
            held = self._refresher.held(handle.storage_id)
            if held is None:
                raise
            return held

    def expired(self) -> SessionExpiredError:
        return SessionExpiredError(
            login_url=self._login_url, set_cookie=self._cookies.clear_session_header()
        )

    async def authenticate(self, request: web.Request, route: Route) -> Principal:
        value = self._cookies.session_value(request)  # read once: this is every request
        if value is None:
            raise AuthenticationRequiredError(
                "log in, or send a Bearer access token", login_url=self._login_url
            )
        self.check_csrf(request)
        handle = self._cookies.handle_of(value)
        if handle is None:
            raise self.expired()
        # Most requests: this process's copy, its token good for a while yet. Answered
        # without an await, as the path below would answer it.
        cached = self._store.cached(handle)
        if cached is not None:
            fresh = self._refresher.fresh(handle, cached)
            if fresh is not None:
                return self._principal_of(handle, fresh)
        # One deadline for the request's store calls: Redis gone answers 503 within
        # session.redis_timeout_s. A refresh it waits for bounds its own calls.
        with self._store.deadline():
            session = cached if cached is not None else await self._load(handle)
            if session is None:
                raise self.expired()
            try:
                session = await self._refresher.ensure_fresh(handle, session)
            except SessionExpiredError:
                raise self.expired() from None
        return self._principal_of(handle, session)

    def _principal_of(self, handle: SessionHandle, session: Session) -> Principal:
        memo = self._principals.get(handle.storage_id)
        if memo is not None and memo[0] is session:
            return memo[1]
        principal = principal_of(handle, session)
        if len(self._principals) >= self._principals_kept:
            self._principals.clear()
        self._principals[handle.storage_id] = (session, principal)
        return principal

    async def after_upstream_rejection(self, principal: Principal) -> Principal | None:
        """The upstream answered 401 to ``principal``'s token: force one refresh. None when
        there is nothing new to try."""
        if principal.handle is None:
            return None
        with self._store.deadline():  # a deadline of its own: the upstream took its time
            session = await self._load_or_held(principal.handle)
            if session is None:
                raise self.expired()
            if session.access_token == principal.access_token:
                try:
                    session = await self._refresher.ensure_fresh(
                        principal.handle, session, force=True
                    )
                except SessionExpiredError:
                    raise self.expired() from None
        if session.access_token == principal.access_token:
            return None
        return principal_of(principal.handle, session)

    async def wait_ended(self, handle: SessionHandle) -> None:
        """Return once the session has ended: logged out, ended by the IdP or a refused
        refresh (on any replica), past its absolute timeout, or gone from the store.

        A write (a refresh) wakes this too: the session is loaded again and, still there,
        watched on. A store that cannot answer is asked again later: a logout needs that
        store too, and the absolute timeout is kept by this process's clock meanwhile."""
        ends_at = float("inf")
        while True:
            with self._store.watch(handle.storage_id) as watch:  # before the load: see model
                try:
                    session = await self._store.load(handle)
                except SessionStoreUnavailableError:
                    pass  # counted and logged by the store
                else:
                    if session is None:
                        return
                    ends_at = session.created_at + self._absolute_timeout_s
                left_s = ends_at - self._clock()
                if left_s <= 0:
                    return
                every_s = _RECHECK_S if watch.told else _POLL_S
                # Not a secret, only a spread: random is the right tool.
                every_s *= random.uniform(1 - _JITTER, 1)  # noqa: S311
                await asyncio.wait((watch.changed,), timeout=min(left_s, every_s))


def principal_of(handle: SessionHandle, session: Session) -> Principal:
    return Principal(
        subject=session.subject,
        scopes=frozenset(session.scopes),
        claims=session.claims,
        expires_at=session.access_expires_at,
        access_token=session.access_token,
        via="session",
        handle=handle,
    )
