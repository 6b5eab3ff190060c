"""What a token endpoint answers, as values, and the two ways a refresh can fail.

Every dialect (``idp.oauth2``, ``idp.json_dialect``) maps its replies onto these, from status
codes and fields, never from strings in exception texts: ``RefreshRejected`` means the
refresh token is dead (end the session); ``IdpUnavailable`` means try again later.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt

from gateway.sessions.model import Session


class RefreshRejected(Exception):
    """The IdP says the grant is dead (``invalid_grant`` or the dialect's equivalent)."""


class IdpUnavailable(Exception):
    """The IdP could not answer usefully now: network, timeout, 5xx, or a garbled reply."""


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str = field(repr=False)
    expires_at: float
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] | None = None
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a secret


class RefreshDialect(Protocol):
    async def refresh(self, session: Session) -> TokenSet:
        """Trade the session's refresh token for new tokens, or raise one of the two above."""


def parse_expiry(
    access_token: str, expires_in: Any, default_lifetime_s: float, now: float | None = None
) -> float:
    """When the access token expires: ``expires_in``, else the JWT's ``exp``, else a default."""
    now = time.time() if now is None else now
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        return now + float(expires_in)
    if isinstance(expires_in, str) and expires_in.isdigit():
        return now + float(expires_in)
    claims = parse_unverified_claims(access_token)
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return now + default_lifetime_s


def parse_unverified_claims(token: str) -> Mapping[str, Any]:
    """Claims of a JWT we received from the IdP itself over TLS; {} for opaque tokens.

    SECURITY: only for tokens the IdP handed us directly (expiry, scope bookkeeping);
    never for anything a client sent.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


def parse_scope_field(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return None
