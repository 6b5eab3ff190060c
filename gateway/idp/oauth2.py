"""OAuth 2.0 calls at the IdP: code exchange (RFC 6749 §4.1.3 + PKCE), refresh (§6),
revocation (RFC 7009), with client authentication none, client_secret_basic,
client_secret_post or private_key_jwt (RFC 7523).

Replies are mapped to ``TokenSet`` / ``RefreshRejected`` / ``IdpUnavailable`` here, from
status and the ``error`` field. Locking and storing the result are ``sessions.refresh``'s.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from opentelemetry.trace import SpanKind, Tracer

from gateway.idp.client_auth import ClientAuthentication
from gateway.idp.discovery import Discovery
from gateway.idp.tokens import (
    IdpUnavailable,
    RefreshRejected,
    TokenSet,
    idp_call,
    parse_expiry,
    parse_scope_field,
)
from gateway.metrics import Metrics
from gateway.sessions.model import Session
from gateway.settings import OidcSettings, RefreshSettings
from gateway.tracing import NO_TRACER

log = logging.getLogger(__name__)

# RFC 6749 §5.2: the grant (code or refresh token) is dead; anything else is not the user's.
_DEAD_GRANT_ERRORS = frozenset({"invalid_grant"})


class OAuth2Client:
    """Borrows the IdP ``ClientSession``; every call runs under ``refresh.timeout_s``."""

    def __init__(
        self,
        oidc: OidcSettings,
        refresh: RefreshSettings,
        discovery: Discovery,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._oidc = oidc
        self._refresh = refresh
        self._discovery = discovery
        self._http = http
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=refresh.timeout_s)
        self._client_auth = ClientAuthentication(oidc)

    async def exchange_code(self, code: str, code_verifier: str, redirect_uri: str) -> TokenSet:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        return await self._token_request(form, call="code_exchange")

    async def refresh(self, session: Session) -> TokenSet:
        if not session.refresh_token:
            raise RefreshRejected("the session has no refresh token")
        form = {"grant_type": "refresh_token", "refresh_token": session.refresh_token}
        if self._refresh.scope:
            form["scope"] = " ".join(self._refresh.scope)  # RFC 6749 §6: may narrow, not widen
        return await self._token_request(form, call="refresh")

    async def revoke(self, token: str, token_type_hint: str) -> bool:
        """RFC 7009, where discovery advertises an endpoint; False when it could not be done."""
        endpoint = (await self._discovery.load()).revocation_endpoint
        if endpoint is None:
            return False
        form = {"token": token, "token_type_hint": token_type_hint}
        try:
            status, _ = await self._post(endpoint, form, call="revocation")
        except IdpUnavailable:
            return False
        return status == 200

    async def _token_request(self, form: dict[str, str], *, call: str) -> TokenSet:
        endpoint = self._refresh.token_endpoint or (await self._discovery.load()).token_endpoint
        if endpoint is None:
            raise IdpUnavailable("the IdP advertises no token endpoint")
        status, body = await self._post(endpoint, form, call=call)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("access_token"), str):
            return self._token_set(body)
        error = body.get("error") if isinstance(body, dict) else None
        if status in (400, 401) and error in _DEAD_GRANT_ERRORS:
            raise RefreshRejected(str(error))
        log.warning(
            "token_endpoint_error", extra={"call": call, "status": status, "error": str(error)[:64]}
        )
        raise IdpUnavailable(f"token endpoint answered HTTP {status}")

    def _token_set(self, body: dict[str, Any]) -> TokenSet:
        access_token = body["access_token"]
        refresh_token = body.get("refresh_token")
        id_token = body.get("id_token")
        return TokenSet(
            access_token=access_token,
            expires_at=parse_expiry(
                access_token, body.get("expires_in"), self._refresh.default_lifetime_s
            ),
            refresh_token=refresh_token if isinstance(refresh_token, str) else None,
            id_token=id_token if isinstance(id_token, str) else None,
            scopes=parse_scope_field(body.get("scope")),
            token_type=str(body.get("token_type", "Bearer")),
        )

    async def _post(self, endpoint: str, form: dict[str, str], *, call: str) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        form = {**form, **self._client_auth.fields(endpoint, headers)}
        with (
            self._tracer.start_as_current_span(
                f"idp {call}", kind=SpanKind.CLIENT, attributes={"tokengate.idp.call": call}
            ),
            idp_call(self._metrics, call),
        ):
            async with self._http.post(
                endpoint, data=form, headers=headers, timeout=self._timeout
            ) as resp:
                status = resp.status
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
        return status, body
