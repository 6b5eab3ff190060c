"""Token capture: a login that is an API call (``POST /User/Login``, a password grant)
whose JSON reply carries tokens. On a route with ``capture_tokens`` the reply's tokens
become a new server-side session and the browser gets the reply without them, plus the
session cookie.

Sessions made here have no OIDC login behind them. Without ``oidc.issuer`` (or
``oidc.jwks_uri``) tokengate cannot verify the tokens: the access token is treated as
opaque and trusted as the system behind the route issued it, over the route's connection;
a JWT's claims (``sub``, ``exp``, scopes) are read unverified. Forwarding is
``upstream``'s; refreshing these sessions is the refresh dialect's (``idp.json_dialect``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import UpstreamTimeoutError, UpstreamUnavailableError
from gateway.idp.json_paths import (
    MAX_JSON_REPLY_BYTES,
    parse_json_reply,
    parse_path,
    read_limited,
    remove_members,
    remove_path,
)
from gateway.idp.tokens import parse_expiry, parse_unverified_claims
from gateway.metrics import Metrics
from gateway.principal import parse_scopes
from gateway.routing import Route
from gateway.sessions.cookie import SessionCookies, new_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session, SessionStore
from gateway.set_cookie import CookieGuard, parse_set_cookie_name
from gateway.settings import CaptureSettings, JsonResponsePaths
from gateway.upstream import HOP_BY_HOP, UpstreamReply, connection_tokens, header_values

log = logging.getLogger(__name__)

# SECURITY: members removed from every reply of a capture route, at any depth, besides the
# configured paths: the browser must never see a token, even one we were not told about.
_TOKEN_NAMES = frozenset({"accesstoken", "refreshtoken", "idtoken"})
_DROP = HOP_BY_HOP | {"content-length"}
# Describe the upstream's bytes; once tokens are cut out they describe nothing we send.
_DROP_WHEN_REWRITTEN = frozenset(
    {"content-type", "etag", "content-md5", "digest", "content-digest", "repr-digest"}
)
_NO_BODY_STATUSES = frozenset({204, 304})


def _normalised(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def strip_tokens(data: Any, paths: JsonResponsePaths, tokens: frozenset[str]) -> tuple[Any, bool]:
    """``data`` without its token members: the configured paths, any member named like a
    token, and any member whose value is one of ``tokens``. Pure."""
    removed = False
    for path in (paths.access_token, paths.refresh_token):
        if path is not None:
            data, cut = remove_path(data, path)
            removed = removed or cut
    data, cut = remove_members(
        data,
        lambda name, value: (
            _normalised(name) in _TOKEN_NAMES or (isinstance(value, str) and value in tokens)
        ),
    )
    return data, removed or cut


def parse_subject(reply: Any, settings: CaptureSettings, claims: dict[str, Any]) -> str:
    """The subject: the reply's ``subject_path``, else the JWT's ``sub``, else "unknown"."""
    if settings.subject_path is not None:
        value = parse_path(reply, settings.subject_path)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else "unknown"


class TokenCapture:
    def __init__(
        self,
        store: SessionStore,
        cookies: SessionCookies,
        default_lifetime_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        check_csrf: Callable[[web.Request], None] | None = None,
    ) -> None:
        self._store = store
        self._cookies = cookies
        self._guard = CookieGuard(frozenset((cookies.name, cookies.login_name)))
        self._default_lifetime_s = default_lifetime_s
        self._metrics = metrics
        self._clock = clock
        self._check_csrf = check_csrf

    def prepare(self, request: web.Request, headers: CIMultiDict[str]) -> None:
        """Before a login is forwarded: the CSRF check, and ask for a reply we can read."""
        # SECURITY: a login sets our cookie; without the CSRF header a cross-site form could
        # log the browser into someone else's account (login CSRF).
        if self._check_csrf is not None:
            self._check_csrf(request)
        # A compressed reply could not be read for tokens (and would pass them through).
        headers["Accept-Encoding"] = "identity"

    async def relay(
        self,
        request: web.Request,
        route: Route,
        upstream_response: UpstreamReply,
        settings: CaptureSettings,
    ) -> web.StreamResponse:
        """The upstream's reply for the browser: tokens out, a session cookie in when the
        reply was a successful login; otherwise the reply as it came."""
        upstream = upstream_response
        if request.method == "HEAD" or upstream.status in _NO_BODY_STATUSES:
            upstream.release()
            raw = b""
        else:
            raw = await self._read(upstream)
        reply = parse_json_reply(raw) if raw else None
        session = None if reply is None else self._session_of(upstream.status, reply, settings)
        known: frozenset[str] = frozenset()
        if session is not None:
            known = frozenset(t for t in (session.access_token, session.refresh_token) if t)
        headers = self._headers(upstream, known)
        body = raw
        if reply is not None:
            stripped, removed = strip_tokens(reply, settings.response, known)
            if removed:
                body = json.dumps(stripped, separators=(",", ":")).encode()
                for name in _DROP_WHEN_REWRITTEN:
                    headers.popall(name, None)
                headers["Content-Type"] = "application/json; charset=utf-8"
        response = web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=body or None
        )
        response.headers["Cache-Control"] = "no-store"
        if session is not None:
            await self._start_session(request, response, session)
            log.info("login", extra={"result": "success", "via": "capture", "route": route.name})
        return response

    async def _read(self, upstream: UpstreamReply) -> bytes:
        encodings = header_values(upstream.headers, "content-encoding")
        if any(e.strip().lower() != "identity" for e in encodings):
            # SECURITY: we asked for identity; an encoded reply could carry tokens we
            # cannot see, so it does not reach the browser.
            upstream.close()
            raise UpstreamUnavailableError("the login reply is encoded; it cannot be read")
        try:
            raw = await read_limited(upstream.iter_chunks(), MAX_JSON_REPLY_BYTES)
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except OSError as exc:
            raise UpstreamUnavailableError() from exc
        if raw is None:
            upstream.close()  # the rest is unread
            raise UpstreamUnavailableError("the login reply is too large")
        return raw

    def _headers(self, upstream: UpstreamReply, tokens: frozenset[str]) -> CIMultiDict[str]:
        drop = _DROP | connection_tokens(header_values(upstream.headers, "connection"))
        return CIMultiDict(
            (name, value)
            for name, value in upstream.headers
            if name.lower() not in drop
            and not (name.lower() == "set-cookie" and self._forbidden_cookie(value))
            # SECURITY: a token echoed in a header (X-Access-Token) is a token all the same.
            and not any(token in value for token in tokens)
        )

    def _forbidden_cookie(self, set_cookie: str) -> bool:
        """An upstream must not plant our cookies (fixation) nor hand the browser a token
        as a cookie of its own (``refreshToken=...``)."""
        if self._guard.plants(set_cookie):
            return True
        return _normalised(parse_set_cookie_name(set_cookie) or "") in _TOKEN_NAMES

    def _session_of(self, status: int, reply: Any, settings: CaptureSettings) -> Session | None:
        """The session a successful login reply starts, or None."""
        paths = settings.response
        if not 200 <= status < 300:
            return None
        if paths.success is not None and parse_path(reply, paths.success) != paths.success_value:
            return None
        access_token = parse_path(reply, paths.access_token)
        if not isinstance(access_token, str) or not access_token:
            return None
        refresh_token = parse_path(reply, paths.refresh_token) if paths.refresh_token else None
        if not isinstance(refresh_token, str) or not refresh_token:
            refresh_token = None
        expires_in = parse_path(reply, paths.expires_in) if paths.expires_in else None
        now = self._clock()
        jwt_claims = dict(parse_unverified_claims(access_token))
        subject = parse_subject(reply, settings, jwt_claims)
        tokens = {access_token, refresh_token}
        claims: dict[str, Any] = {"sub": subject}
        for name, path in settings.claims_paths.items():
            value = parse_path(reply, path)
            # SECURITY: /auth/session shows the claims to the browser: never a token.
            if value is not None and not (isinstance(value, str) and value in tokens):
                claims[name] = value
        return Session(
            subject=subject,
            access_token=access_token,
            access_expires_at=parse_expiry(
                access_token, expires_in, self._default_lifetime_s, now=now
            ),
            refresh_token=refresh_token,
            scopes=tuple(sorted(parse_scopes(jwt_claims))),
            claims=claims,
            created_at=now,
        )

    async def _start_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        previous = self._cookies.session_handle(request)
        if previous is not None:
            await self._store.delete(previous)  # no fixation: a login always starts afresh
        secret = new_secret()
        await self._store.create(derive_handle(secret), session)
        self._metrics.sessions_created_total.inc()
        self._cookies.set_session(response, secret)
