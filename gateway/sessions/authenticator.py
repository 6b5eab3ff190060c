"""Session authentication for ``session`` routes: cookie, CSRF, load, fresh access token.

Returns the same ``Principal`` a Bearer token would, carrying the session's access token,
so ``upstream`` forwards both alike. The refresh itself is ``sessions.refresh``'s; where the
cookie's secret leads is ``sessions.cookie`` and ``sessions.crypto``'s.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from gateway.errors import AuthenticationRequiredError, CsrfError, SessionExpiredError
from gateway.principal import Principal
from gateway.routing import Route
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.model import Session, SessionHandle, SessionStore
from gateway.sessions.refresh import Refresher
from gateway.settings import CsrfSettings


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
    ) -> None:
        self._cookies = cookies
        self._store = store
        self._refresher = refresher
        self._csrf_header = csrf.header
        self._origin = origin_of(public_url)
        self._login_url = f"{public_url}/auth/login"
        # The principal of each session as last loaded, by storage id: a cached session is
        # the same object on every request until it changes, and so is its principal.
        # Bounded: cleared when it holds ``principals_kept``.
        self._principals: dict[str, tuple[Session, Principal]] = {}
        self._principals_kept = principals_kept

    def login_url(self, request: web.Request) -> str:
        return self._login_url

    def check_csrf(self, request: web.Request) -> None:
        """Cookie-authenticated requests must carry our custom header (a cross-site page
        cannot add one without a CORS preflight we never grant) and no foreign Origin."""
        if not request.headers.get(self._csrf_header):
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
        return None if value is None else await self._load(value)

    async def _load(self, value: str) -> tuple[SessionHandle, Session] | None:
        handle = self._cookies.handle_of(value)
        if handle is None:
            return None
        session = await self._store.load(handle, cached=True)
        if session is None:
            self._principals.pop(handle.storage_id, None)
            return None
        return handle, session

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
        loaded = await self._load(value)
        if loaded is None:
            raise self.expired()
        handle, session = loaded
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
        session = await self._store.load(principal.handle)
        if session is None:
            raise self.expired()
        if session.access_token == principal.access_token:
            try:
                session = await self._refresher.ensure_fresh(principal.handle, session, force=True)
            except SessionExpiredError:
                raise self.expired() from None
        if session.access_token == principal.access_token:
            return None
        return principal_of(principal.handle, session)


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
