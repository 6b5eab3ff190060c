"""Who a request acts for, once ``auth`` has established it; a plain value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.sessions.model import SessionHandle


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    claims: Mapping[str, Any]
    expires_at: float
    access_token: str = field(repr=False)  # SECURITY: never in a repr, so never in a log
    via: Literal["bearer", "session"] = "bearer"
    handle: SessionHandle | None = field(default=None, repr=False)  # session requests only
    provider: str = ""  # the trusted issuer's name (``tokens.providers``); "" for sessions
    # The token's DPoP binding (cnf.jkt, RFC 9449 §6): ``auth`` lets such a token through
    # only with a proof signed by that key.
    dpop_jkt: str | None = None


def parse_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (RFC 8693 §4.2, space-delimited) or ``scp`` (an array, or
    space-delimited as Microsoft Entra ID sends it)."""
    value = claims.get("scope", claims.get("scp"))
    if isinstance(value, str):
        return frozenset(parse_scope_tokens(value))
    if isinstance(value, list | tuple):
        # Verified claims hold strings only (``tokens.jws``); unverified ones may not.
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def parse_scope_tokens(value: str) -> tuple[str, ...]:
    """The scope-tokens of a space-delimited scope (RFC 6749 §3.3), in order.

    SECURITY: split on U+0020 only, not ``str.split()``'s any whitespace: the scope
    "openid\\u00a0api.read" is one odd scope-token, not ``api.read``. Empty strings (runs of
    spaces) are dropped.
    """
    return tuple(token for token in value.split(" ") if token)
