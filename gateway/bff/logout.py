"""Ending sessions: ``POST /auth/logout`` from the browser, ``POST /auth/backchannel-logout``
from the IdP (OpenID Connect Back-Channel Logout 1.0), and ``GET /auth/session``, which
tells the SPA whether it is logged in — never with a token.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.bff.login import no_store
from gateway.errors import BadRequestError, CsrfError, GatewayError, NotFoundError
from gateway.idp.discovery import Discovery
from gateway.idp.oauth2 import OAuth2Client
from gateway.idp.tokens import IdpUnavailable
from gateway.metrics import Metrics
from gateway.sessions.authenticator import SessionAuthenticator
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.model import Session, SessionStore
from gateway.tokens.jws import LOGOUT_TOKEN_TYPES
from gateway.tokens.validator import TokenValidator

log = logging.getLogger(__name__)

_BCL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
_LOGOUT_TOKEN_MAX_AGE_S = 300.0
_JTI_MEMORY_S = 900


class SessionInfo:
    """``GET /auth/session``: whether the browser is logged in, its claims, when the session
    ends at the latest. Never a token."""

    def __init__(
        self, sessions: SessionAuthenticator, cookies: SessionCookies, absolute_timeout_s: int
    ) -> None:
        self._sessions = sessions
        self._cookies = cookies
        self._absolute_timeout_s = absolute_timeout_s

    async def session_info(self, request: web.Request) -> web.StreamResponse:
        if not self._cookies.has_session_cookie(request):
            return no_store(web.json_response({"authenticated": False}))
        self._sessions.check_csrf(request)
        loaded = await self._sessions.load(request)
        if loaded is None:
            response = web.json_response({"authenticated": False})
            self._cookies.clear_session(response)
            return no_store(response)
        _, session = loaded
        body: dict[str, Any] = {
            "authenticated": True,
            "claims": dict(session.claims),
            "expires_at": int(session.created_at + self._absolute_timeout_s),
        }
        return no_store(web.json_response(body))


class Logout:
    """``POST /auth/logout``: the session ends here; the grant is revoked (RFC 7009) or a
    custom API's logout called, best effort; the browser gets the IdP's end-session URL."""

    def __init__(
        self,
        sessions: SessionAuthenticator,
        store: SessionStore,
        cookies: SessionCookies,
        discovery: Discovery,
        oauth: OAuth2Client,
        metrics: Metrics,
        *,
        client_id: str,
        after_logout_url: str,
        end_grant: Callable[[Session], Awaitable[bool]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._cookies = cookies
        self._discovery = discovery
        self._oauth = oauth
        self._metrics = metrics
        self._client_id = client_id
        self._after_logout = after_logout_url
        self._end_grant = end_grant  # a custom token API's logout, instead of RFC 7009

    async def logout(self, request: web.Request) -> web.StreamResponse:
        form_post = request.content_type == "application/x-www-form-urlencoded"
        if form_post:
            # A plain HTML form cannot add our header; it must at least be same-origin.
            origin = request.headers.get("Origin")
            site = request.headers.get("Sec-Fetch-Site")
            if origin is None and site is None:
                raise CsrfError("a form logout must come from this site")
            if origin is not None:
                self._sessions.check_csrf_origin(origin)
            if site is not None and site not in ("same-origin", "none"):
                raise CsrfError("a form logout must come from this site")
        else:
            self._sessions.check_csrf(request)
        logout_url = self._after_logout
        loaded = await self._sessions.load(request)
        if loaded is not None:
            handle, session = loaded
            # The session ends here whatever the IdP says; the IdP calls are best effort.
            await self._store.delete(handle)
            self._metrics.sessions_ended_total.labels(reason="logout").inc()
            log.info("logout", extra={"result": "success"})
            if self._end_grant is not None:
                await self._end_grant(session)  # best effort, like revocation
            elif session.refresh_token:
                # RP-initiated logout does not end offline grants at every IdP: revoke ours.
                with contextlib.suppress(IdpUnavailable):
                    await self._oauth.revoke(session.refresh_token, "refresh_token")
            logout_url = await self._end_session_url(session.id_token)
        if form_post:
            response: web.StreamResponse = web.Response(
                status=303, headers={"Location": logout_url}
            )
        else:
            response = web.json_response({"logout_url": logout_url})
        self._cookies.clear_session(response)
        return no_store(response)

    async def _end_session_url(self, id_token: str | None) -> str:
        try:
            metadata = await self._discovery.load()
        except IdpUnavailable:
            return self._after_logout
        if metadata.end_session_endpoint is None:
            return self._after_logout
        params = {
            "client_id": self._client_id,
            "post_logout_redirect_uri": self._after_logout,
        }
        if id_token:
            params["id_token_hint"] = id_token
        return f"{metadata.end_session_endpoint}?{urlencode(params)}"


class BackchannelLogout:
    """``POST /auth/backchannel-logout`` from the IdP (OpenID Connect Back-Channel Logout
    1.0): a verified logout token ends the sessions of its ``sid``, else of its ``sub``."""

    def __init__(
        self,
        validator: TokenValidator | None,
        store: SessionStore,
        metrics: Metrics,
        *,
        client_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._validator = validator
        self._store = store
        self._metrics = metrics
        self._client_id = client_id
        self._clock = clock

    async def backchannel_logout(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = form.get("logout_token")
        if not isinstance(token, str) or not token:
            raise BadRequestError("logout_token is required")
        claims = await self._validate_logout_token(token)
        sid = claims.get("sid")
        if isinstance(sid, str) and sid:
            ended = await self._store.delete_by_idp_session(sid)
        else:
            ended = await self._store.delete_by_subject(str(claims["sub"]))
        if ended:
            self._metrics.sessions_ended_total.labels(reason="backchannel_logout").inc(ended)
        log.info("logout", extra={"result": "backchannel", "sessions": ended})
        return no_store(web.Response(status=200))

    async def _validate_logout_token(self, token: str) -> dict[str, Any]:
        """Back-Channel Logout 1.0 §2.6: a 400 for every failure, never a 401."""
        if self._validator is None:
            raise NotFoundError()
        try:
            claims = await self._validator.verify_jwt(
                token,
                audience=(self._client_id,),
                require=["iss", "aud", "iat", "jti", "events"],
                token_types=LOGOUT_TOKEN_TYPES,  # BCL 1.0 §2.4: typ logout+jwt, if any
            )
        except GatewayError as exc:
            raise BadRequestError(f"invalid logout_token: {exc.description}") from None
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(_BCL_EVENT), dict):
            raise BadRequestError("invalid logout_token: no back-channel logout event")
        if "nonce" in claims:
            raise BadRequestError("invalid logout_token: a nonce is forbidden")
        if not claims.get("sub") and not claims.get("sid"):
            raise BadRequestError("invalid logout_token: needs sub or sid")
        iat = claims["iat"]
        if not isinstance(iat, int | float) or self._clock() - iat > _LOGOUT_TOKEN_MAX_AGE_S:
            raise BadRequestError("invalid logout_token: too old")
        if not await self._store.remember_once("jti", str(claims["jti"]), _JTI_MEMORY_S):
            raise BadRequestError("invalid logout_token: replayed")
        return claims
