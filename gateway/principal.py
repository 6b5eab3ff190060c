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


def parse_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (RFC 8693 §4.2, space-delimited) or ``scp`` (an array)."""
    value = claims.get("scope", claims.get("scp"))
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(str(v) for v in value)
    return frozenset()
