"""OAuth 2.0 client authentication at an IdP endpoint: none, client_secret_basic,
client_secret_post (RFC 6749 §2.3.1) or private_key_jwt (RFC 7523 §2.2).

One object per set of client credentials: the token endpoint's (``oauth2``) and each
introspecting provider's (``tokens.introspection``). What the endpoint answers is theirs.
"""

from __future__ import annotations

import base64
import secrets
import time
from urllib.parse import quote

import jwt

from gateway.settings import ClientAuthSettings

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class ClientAuthentication:
    def __init__(self, settings: ClientAuthSettings) -> None:
        self._settings = settings

    def fields(self, endpoint: str, headers: dict[str, str]) -> dict[str, str]:
        """Form fields that authenticate us at ``endpoint`` (and the Basic header, set in
        ``headers``)."""
        settings = self._settings
        method = settings.effective_client_auth
        secret = settings.client_secret.get_secret_value() if settings.client_secret else ""
        if method == "client_secret_basic":
            # RFC 6749 §2.3.1: both parts form-urlencoded before base64.
            pair = f"{quote(settings.client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            return {}
        if method == "client_secret_post":
            return {"client_id": settings.client_id, "client_secret": secret}
        if method == "private_key_jwt":
            return {
                "client_id": settings.client_id,
                "client_assertion_type": _ASSERTION_TYPE,
                "client_assertion": self._assertion(endpoint),
            }
        return {"client_id": settings.client_id}

    def _assertion(self, endpoint: str) -> str:
        """RFC 7523 §3: a short-lived JWT signed with our private key, one use (jti)."""
        settings = self._settings
        assert settings.private_key is not None  # checked by the settings
        # Real time, not the app's clock: the IdP checks iat and exp against its own.
        now = int(time.time())
        claims = {
            "iss": settings.client_id,
            "sub": settings.client_id,
            "aud": endpoint,
            "jti": secrets.token_urlsafe(24),
            "iat": now,
            "exp": now + 60,
        }
        headers = {"kid": settings.private_key_id} if settings.private_key_id else None
        return jwt.encode(
            claims,
            settings.private_key.get_secret_value(),
            algorithm=settings.private_key_alg,
            headers=headers,
        )
