"""Login: ``GET /auth/login`` starts the authorization code flow with PKCE (RFC 7636, S256),
``state`` and ``nonce``; ``GET /auth/callback`` checks it, exchanges the code, validates the
ID token and creates a new session.

The pending login is kept in the store under the ``state``, encrypted with a key from a
short-lived HttpOnly login cookie, so the callback is bound to the browser that started
it, and each ``state`` works once. Token endpoint calls are ``idp.oauth2``'s.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.bff.return_to import parse_return_to
from gateway.bff.session_start import SessionStarter
from gateway.errors import BadRequestError, GatewayError, IdpError, LoginStateError
from gateway.idp.discovery import Discovery
from gateway.idp.oauth2 import OAuth2Client
from gateway.idp.tokens import IdpUnavailable, RefreshRejected, parse_unverified_claims
from gateway.metrics import Metrics
from gateway.principal import parse_scopes
from gateway.sessions.cookie import SessionCookies, encode_secret, new_secret
from gateway.sessions.crypto import derive_handle, digest
from gateway.sessions.model import LoginState, Session, SessionStore
from gateway.settings import OidcSettings
from gateway.tokens.jws import ID_TOKEN_TYPES
from gateway.tokens.validator import TokenValidator

log = logging.getLogger(__name__)

# RFC 6749 §4.1.2.1 error codes an IdP may send back; anything else is reported generically.
_IDP_ERRORS = frozenset(
    {
        "access_denied",
        "invalid_request",
        "unauthorized_client",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "login_required",
        "consent_required",
        "interaction_required",
        "account_selection_required",
    }
)


class LoginFailedError(GatewayError):
    status = 401
    code = "login_failed"
    default_description = "the identity provider did not complete the login"


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)  # 64 chars, within RFC 7636 §4.1's 43..128
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def no_store(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Cache-Control"] = "no-store"
    return response


def redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


class LoginEndpoints:
    def __init__(
        self,
        oidc: OidcSettings,
        discovery: Discovery,
        oauth: OAuth2Client,
        validator: TokenValidator,
        store: SessionStore,
        cookies: SessionCookies,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        redirect_uri: str,
        login_timeout_s: int,
    ) -> None:
        self._oidc = oidc
        self._redirect_uri = redirect_uri
        self._login_timeout_s = login_timeout_s
        self._discovery = discovery
        self._oauth = oauth
        self._validator = validator
        self._store = store
        self._cookies = cookies
        self._metrics = metrics
        self._starter = SessionStarter(store, cookies, metrics)
        self._clock = clock

    async def login(self, request: web.Request) -> web.StreamResponse:
        return_to = parse_return_to(request.query.get("return_to"))
        if return_to is None:
            raise BadRequestError("return_to must be a path on this site")
        try:
            metadata = await self._discovery.load()
        except IdpUnavailable:
            raise IdpError("the identity provider's discovery document is unavailable") from None
        if metadata.authorization_endpoint is None:
            raise IdpError("the IdP advertises no authorization endpoint")
        oidc = self._oidc
        # One binding cookie per browser, reused so logins in several tabs do not clash.
        binding = self._cookies.login_secret(request) or new_secret()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier, challenge = pkce_pair()
        pending = LoginState(
            binding=digest(encode_secret(binding)),
            code_verifier=verifier,
            nonce=nonce,
            return_to=return_to,
            created_at=self._clock(),
        )
        await self._store.put_login_state(
            state, derive_handle(binding).key, pending, self._login_timeout_s
        )
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": oidc.client_id,
            "redirect_uri": self._redirect_uri,
            "scope": " ".join(oidc.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        prompt = oidc.prompt
        if prompt is None and oidc.consent_for_offline_access and "offline_access" in oidc.scopes:
            prompt = "consent"  # some providers grant offline_access only with consent
        if prompt:
            params["prompt"] = prompt
        if oidc.acr_values:
            params["acr_values"] = oidc.acr_values
        params.update(oidc.extra_auth_params)
        response = redirect(f"{metadata.authorization_endpoint}?{urlencode(params)}")
        self._cookies.set_login(response, binding)
        return response

    async def callback(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        error = query.get("error")
        if error is not None:
            reported = error if error in _IDP_ERRORS else "error"
            log.info("login", extra={"result": "idp_error", "error": reported})
            raise LoginFailedError(f"the identity provider answered: {reported}")
        state, code = query.get("state"), query.get("code")
        if not state or not code:
            raise BadRequestError("the callback needs code and state")
        binding = self._cookies.login_secret(request)
        if binding is None:
            raise LoginStateError()
        pending = await self._store.take_login_state(state, derive_handle(binding).key)
        if pending is None or pending.binding != digest(encode_secret(binding)):
            raise LoginStateError()
        oidc = self._oidc
        issuer = query.get("iss")
        if issuer is not None and oidc.issuer is not None and issuer.rstrip("/") != oidc.issuer:
            raise LoginStateError("the callback came from another issuer")  # RFC 9207 §2.4
        try:
            tokens = await self._oauth.exchange_code(
                code, pending.code_verifier, self._redirect_uri
            )
        except RefreshRejected:
            raise LoginStateError("the authorization code was refused; log in again") from None
        except IdpUnavailable:
            raise IdpError("the identity provider's token endpoint is unavailable") from None
        if tokens.id_token is None:
            raise IdpError("the identity provider returned no ID token")
        claims = await self.validate_id_token(tokens.id_token, pending.nonce)
        now = self._clock()
        access_claims = parse_unverified_claims(tokens.access_token)
        scopes = tokens.scopes or tuple(sorted(parse_scopes(access_claims)))
        keep = self._oidc.claims_in_session
        session = Session(
            subject=str(claims["sub"]),
            access_token=tokens.access_token,
            access_expires_at=tokens.expires_at,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            scopes=scopes,
            claims={k: claims[k] for k in keep if k in claims},
            idp_session_id=claims["sid"] if isinstance(claims.get("sid"), str) else None,
            created_at=now,
        )
        response = redirect(pending.return_to)
        await self._starter.start(request, response, session)
        log.info("login", extra={"result": "success"})
        self._cookies.clear_login(response)
        return response

    async def validate_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """OIDC Core §3.1.3.7: signature, iss, aud, exp, iat, nonce, and azp where present."""
        client_id = self._oidc.client_id
        try:
            claims = await self._validator.verify_jwt(
                id_token,
                audience=(client_id,),
                require=["iss", "aud", "exp", "iat", "sub"],
                token_types=ID_TOKEN_TYPES,
            )
        except GatewayError as exc:
            raise IdpError(f"the ID token is invalid: {exc.description}") from None
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise LoginStateError("the ID token's nonce does not match this login")
        azp = claims.get("azp")
        if azp is not None and azp != client_id:
            raise IdpError("the ID token was issued to another client (azp)")
        return claims
