"""Authentication: which principal a request acts for, by the route's auth mode.

``bearer`` validates the ``Authorization`` header (RFC 6750 §2.1 only: never a query or
form parameter), with the ``Bearer`` scheme or with ``DPoP`` and its proof (RFC 9449 §7);
a DPoP-bound token never passes as Bearer. ``session`` modes defer to the session
authenticator, where a valid token header still wins. Required scopes are checked here,
for both; and here a connection that outlives its request learns when its principal stops
standing (``wait_ended``). Which issuer judges a token is ``tokens.providers``'s question,
a proof's checks ``tokens.dpop``'s; cookies, CSRF and refresh are ``sessions``'s.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from gateway.context import current
from gateway.errors import (
    AuthenticationRequiredError,
    BadRequestError,
    InsufficientScopeError,
    InvalidDpopProofError,
    InvalidTokenError,
)
from gateway.principal import Principal
from gateway.routing import Route
from gateway.sessions.model import SessionHandle
from gateway.tokens.dpop import DpopVerifier
from gateway.tokens.providers import TokenProviders

_TOKEN_MODES = frozenset({"bearer", "session_or_bearer"})  # routes that take access tokens


class SessionAuthenticator(Protocol):
    async def authenticate(self, request: web.Request, route: Route) -> Principal: ...

    async def after_upstream_rejection(self, principal: Principal) -> Principal | None: ...

    async def wait_ended(self, handle: SessionHandle) -> None: ...


def parse_credentials(request: web.Request) -> tuple[str, str] | None:
    """The request's access token and its scheme (``bearer`` or ``dpop``), None when there
    is none, 400 for two Authorization headers.

    Its syntax is the validator's to judge, on a cache miss: a compact JWS (three base64url
    segments) is stricter than RFC 6750's b64token, and a token in the verified-token cache
    passed that check already, so a cached token costs no pattern match over its bytes."""
    values = request.headers.getall("Authorization", ())
    if not values:
        return None
    if len(values) > 1:
        raise BadRequestError("more than one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    scheme = scheme.lower()
    if scheme != "bearer" and scheme != "dpop":
        return None  # another scheme is no credential of ours (RFC 6750 §3.1)
    return scheme, token.strip()


class Authenticator:
    def __init__(
        self,
        providers: TokenProviders | None,
        sessions: SessionAuthenticator | None = None,
        *,
        dpop: DpopVerifier | None = None,
        public_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._providers = providers
        self._sessions = sessions
        self._dpop = dpop
        self._public_url = public_url  # a proof's htu is the URL the client sent to
        self._clock = clock

    async def authenticate(self, request: web.Request, route: Route) -> Principal | None:
        mode = route.auth
        if mode == "none":
            return None
        credentials = parse_credentials(request)
        try:
            if credentials is not None and self._providers is not None:
                principal = await self._token_principal(request, route, *credentials)
            elif mode == "bearer" or self._sessions is None:
                raise AuthenticationRequiredError("an access token is required")
            else:
                principal = await self._sessions.authenticate(request, route)
        except (InvalidTokenError, AuthenticationRequiredError) as exc:
            if self._dpop is not None and mode in _TOKEN_MODES:
                self._challenge(exc, route, self._dpop, credentials)
            raise
        if not route.scopes <= principal.scopes:
            raise InsufficientScopeError(tuple(sorted(route.scopes)))
        ctx = current()
        if ctx is not None:
            ctx.auth_mode = principal.via
            ctx.subject = principal.subject
        return principal

    async def _token_principal(
        self, request: web.Request, route: Route, scheme: str, token: str
    ) -> Principal:
        assert self._providers is not None
        if scheme == "bearer":
            if route.require_dpop:
                raise self._refused("this resource takes DPoP-bound tokens only", "dpop_required")
            principal = self._providers.cache_hit(token, route)  # no await: most requests
            if principal is None:
                principal = await self._providers.validate(token, route)
            if principal.dpop_jkt is not None:
                # SECURITY: RFC 9449 §7.2: a bound token without its proof could be a stolen
                # one; it never passes as a Bearer token.
                raise self._refused("a DPoP-bound token needs the DPoP scheme", "dpop_bound")
            return principal
        dpop = self._dpop
        if dpop is None:
            raise InvalidTokenError("DPoP is not accepted here", result="dpop_off")
        proofs = request.headers.getall("DPoP", ())
        if len(proofs) != 1:
            raise dpop.refused(
                InvalidDpopProofError("exactly one DPoP header is required", result="proofs")
            )
        principal = self._providers.cache_hit(token, route)
        if principal is None:
            principal = await self._providers.validate(token, route)
        if not principal.dpop_jkt:
            raise self._refused("the token is not DPoP-bound", "not_bound")
        url = self._public_url + request.raw_path.partition("?")[0]
        jkt = await dpop.verify(proofs[0], method=request.method, url=url, access_token=token)
        if not hmac.compare_digest(jkt, principal.dpop_jkt):
            raise dpop.refused(
                InvalidDpopProofError(
                    "the proof is not signed by the token's key", result="wrong_key"
                )
            )
        return principal

    def _refused(self, description: str, result: str) -> InvalidTokenError:
        """A token refused for how it was sent (scheme and binding), counted with the DPoP
        proofs' results when DPoP is on."""
        exc = InvalidTokenError(description, result=result)
        return exc if self._dpop is None else self._dpop.refused(exc)

    @staticmethod
    def _challenge(
        exc: InvalidTokenError | AuthenticationRequiredError,
        route: Route,
        dpop: DpopVerifier,
        credentials: tuple[str, str] | None,
    ) -> None:
        """DPoP's challenge, with its algorithms (RFC 9449 §7.1): beside Bearer's when no
        token came, alone where the request used DPoP or the route requires it."""
        if isinstance(exc, InvalidTokenError):
            used_dpop = credentials is not None and credentials[0] == "dpop"
            if used_dpop or route.require_dpop:
                exc.dpop_algs = dpop.algorithms
                exc.dpop_nonce = dpop.current_nonce()
        else:
            exc.dpop_algs = dpop.algorithms
            exc.bearer = not route.require_dpop

    async def after_upstream_rejection(self, principal: Principal) -> Principal | None:
        """A fresher principal to replay with after an upstream 401, or None."""
        if principal.via != "session" or self._sessions is None:
            return None
        return await self._sessions.after_upstream_rejection(principal)

    async def wait_ended(self, principal: Principal) -> None:
        """Return when ``principal`` stops standing: its session ended (on any replica), or
        its token expired. For connections that outlive their request (WebSockets)."""
        if principal.handle is not None and self._sessions is not None:
            await self._sessions.wait_ended(principal.handle)
            return
        # A token stands until its exp (an introspected one: as long as its answer is kept).
        await asyncio.sleep(max(principal.expires_at - self._clock(), 0.0))
