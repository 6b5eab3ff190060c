"""The ``json`` refresh dialect: a custom token API described in configuration.

One call per refresh (URL, method, static headers, optionally the current access token as
``Authorization: Bearer``, a JSON body template) and an optional best-effort logout call.
Replies are mapped here, from status codes and the fields at configured paths, onto
``TokenSet`` / ``RefreshRejected`` (the refresh token is dead) / ``IdpUnavailable`` (try
later). Locking and storing the result are ``sessions.refresh``'s; sessions themselves come
from token capture (``bff.capture``) or an OIDC login.

Tokens from such an API are trusted as the system issued them: without ``oidc.issuer`` or
``oidc.jwks_uri`` tokengate cannot verify them and treats them as opaque, reading a JWT's
``exp`` (unverified) only to know when to refresh.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from gateway.idp.json_paths import (
    MAX_JSON_REPLY_BYTES,
    parse_json_reply,
    read_limited,
    split_path,
    value_at,
)
from gateway.idp.tokens import (
    IdpUnavailable,
    RefreshRejected,
    TokenSet,
    idp_call,
    parse_expiry,
)
from gateway.metrics import Metrics
from gateway.sessions.model import Session
from gateway.settings import (
    JsonCallSettings,
    JsonDialectSettings,
    JsonResponsePaths,
    RefreshSettings,
)

log = logging.getLogger(__name__)

PLACEHOLDERS = ("refresh_token", "access_token", "client_id", "scope")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def fill_template(template: Any, values: Mapping[str, str]) -> Any:
    """``template`` with ``{placeholder}``s in its string values replaced (recursively
    through objects and arrays; keys are left alone). A string that is exactly one
    placeholder becomes that value whole; unknown ``{names}`` stay as written. Pure."""
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        if whole is not None:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    if isinstance(template, dict):
        return {key: fill_template(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [fill_template(item, values) for item in template]
    return template


def parse_token_reply(
    status: int, body: Any, paths: JsonResponsePaths, default_lifetime_s: float, *, now: float
) -> TokenSet | None:
    """The tokens of a successful reply of a JSON token API, read at the configured
    ``paths`` (a refresh by this dialect, a login by token capture); None for a reply that
    is not a success or carries no access token. Pure."""
    if not 200 <= status < 300:
        return None
    if paths.success is not None and value_at(body, paths.success) != paths.success_value:
        return None
    access_token = value_at(body, paths.access_token)
    if not isinstance(access_token, str) or not access_token:
        return None
    refresh_token = value_at(body, paths.refresh_token) if paths.refresh_token else None
    expires_in = value_at(body, paths.expires_in) if paths.expires_in else None
    token_type = value_at(body, paths.token_type) if paths.token_type else None
    return TokenSet(
        access_token=access_token,
        expires_at=parse_expiry(access_token, expires_in, default_lifetime_s, now=now),
        # None keeps the session's refresh token: the API does not rotate (RFC 6749 §6).
        refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
        token_type=token_type if isinstance(token_type, str) and token_type else "Bearer",
    )


def configured_paths(settings: JsonDialectSettings) -> list[str]:
    paths = settings.response
    candidates = (
        paths.access_token,
        paths.refresh_token,
        paths.expires_in,
        paths.token_type,
        paths.success,
        settings.dead_token_path,
    )
    return [path for path in candidates if path is not None]


class JsonDialect:
    """Borrows the IdP ``ClientSession``; every call runs under ``timeout_s``."""

    def __init__(
        self,
        settings: JsonDialectSettings,
        client_id: str,
        scope: str,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        default_lifetime_s: float,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._scope = scope
        self._http = http
        self._metrics = metrics
        self._default_lifetime_s = default_lifetime_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        for path in configured_paths(settings):
            split_path(path)  # a malformed path fails at start-up, not on the first refresh

    async def refresh(self, session: Session) -> TokenSet:
        if not session.refresh_token:
            raise RefreshRejected("the session has no refresh token")
        status, body = await self._call(self._settings, session, call="refresh")
        tokens = self.parse_tokens(status, body)
        if tokens is not None:
            return tokens
        if self.is_dead_token(status, body):
            raise RefreshRejected(f"the token API answered HTTP {status} for a dead token")
        log.warning("token_endpoint_error", extra={"call": "refresh", "status": status})
        raise IdpUnavailable(f"the token API answered HTTP {status}")

    async def logout(self, session: Session) -> bool:
        """Call the configured logout API, best effort: False when none is configured or
        it failed (the session ends here either way)."""
        call = self._settings.logout
        if call is None:
            return False
        try:
            status, _ = await self._call(call, session, call="logout")
        except IdpUnavailable:
            return False
        if not 200 <= status < 300:
            log.warning("token_endpoint_error", extra={"call": "logout", "status": status})
            return False
        return True

    def parse_tokens(self, status: int, body: Any) -> TokenSet | None:
        """The tokens of a successful reply; None for anything else. Pure but for the clock."""
        return parse_token_reply(
            status, body, self._settings.response, self._default_lifetime_s, now=self._clock()
        )

    def is_dead_token(self, status: int, body: Any) -> bool:
        """The reply says the refresh token is dead (by status, or by the dead-token field)."""
        settings = self._settings
        if status in settings.dead_token_statuses:
            return True
        if settings.dead_token_path is None:
            return False
        marker = value_at(body, settings.dead_token_path)
        return marker is not None and marker in settings.dead_token_values

    def _values(self, session: Session) -> dict[str, str]:
        return {
            "refresh_token": session.refresh_token or "",
            "access_token": session.access_token,
            "client_id": self._client_id,
            "scope": self._scope,
        }

    async def _call(
        self, call_settings: JsonCallSettings, session: Session, *, call: str
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json", **call_settings.headers}
        if call_settings.send_access_token:
            headers["Authorization"] = f"Bearer {session.access_token}"
        body = fill_template(call_settings.body, self._values(session))
        # A GET carries no body unless the template asks for one.
        payload = body if body or call_settings.method != "GET" else None
        with idp_call(self._metrics, call):
            async with self._http.request(
                call_settings.method,
                call_settings.url,
                json=payload,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await read_limited(resp.content.iter_any(), MAX_JSON_REPLY_BYTES)
        return status, None if raw is None else parse_json_reply(raw)


def build_json_dialect(
    refresh: RefreshSettings,
    client_id: str,
    http: aiohttp.ClientSession,
    metrics: Metrics,
    clock: Callable[[], float] = time.time,
) -> JsonDialect | None:
    """The dialect ``refresh.dialect: json`` asks for, or None for ``oauth2``."""
    if refresh.dialect != "json" or refresh.json_api is None:
        return None
    return JsonDialect(
        refresh.json_api,
        client_id,
        " ".join(refresh.scope),
        http,
        metrics,
        refresh.default_lifetime_s,
        timeout_s=refresh.timeout_s,
        clock=clock,
    )
