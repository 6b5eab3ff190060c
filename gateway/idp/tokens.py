"""What a token endpoint answers, as values, and the two ways a refresh can fail.

Every dialect (``idp.oauth2``, ``idp.json_dialect``) maps its replies onto these, from status
codes and fields, never from strings in exception texts: ``RefreshRejected`` means the
refresh token is dead (end the session); ``IdpUnavailable`` means try again later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import jwt

from gateway.metrics import Metrics
from gateway.principal import parse_scope_tokens
from gateway.sessions.model import Session
from gateway.tokens.jws import parse_numeric_date

log = logging.getLogger(__name__)


class RefreshRejected(Exception):
    """The IdP says the grant is dead (``invalid_grant`` or the dialect's equivalent)."""


class IdpUnavailable(Exception):
    """The IdP could not answer usefully now: network, timeout, 5xx, or a garbled reply."""


@contextmanager
def idp_call(metrics: Metrics, call: str) -> Iterator[None]:
    """One HTTP call at the IdP, the one boundary every dialect's calls cross: its duration
    observed as ``call``, and a network failure or timeout made ``IdpUnavailable``.

    SECURITY: only the exception's type is logged; its text may carry the URL."""
    started = time.perf_counter()
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("idp_call_failed", extra={"call": call, "error_type": type(exc).__name__})
        raise IdpUnavailable(type(exc).__name__) from exc
    finally:
        metrics.idp_request_duration_seconds.labels(call=call).observe(
            time.perf_counter() - started
        )


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
    """When the access token expires: the earliest of the JWT's ``exp`` and ``now`` (the
    reply's receipt) + ``expires_in``, each when known; else ``now`` + the default.

    SECURITY: the earliest, so neither a long ``expires_in`` nor a far ``exp`` keeps a token
    in use past what the other says. ``exp`` is read unverified, and only as a number.
    """
    now = time.time() if now is None else now
    known: list[float] = []
    exp = parse_numeric_date(parse_unverified_claims(access_token).get("exp"))
    if exp is not None:
        known.append(exp)
    lifetime_s = parse_expires_in(expires_in)
    if lifetime_s is not None:
        known.append(now + lifetime_s)
    return min(known) if known else now + default_lifetime_s


def parse_expires_in(value: Any) -> float | None:
    """``expires_in`` in seconds (RFC 6749 §5.1: a number; some IdPs send a digit string),
    or None unless it is a positive, finite number."""
    if isinstance(value, str) and value.isascii() and value.isdigit():  # not "²", nor Arabic digits
        value = float(value)  # "9" * 400 is inf, refused below
    seconds = parse_numeric_date(value)  # a finite JSON number, as a NumericDate is
    return seconds if seconds is not None and seconds > 0 else None


def parse_unverified_claims(token: str) -> Mapping[str, Any]:
    """Claims of a JWT we received from the IdP itself over TLS; {} for opaque tokens.

    SECURITY: only for tokens the IdP handed us directly (expiry, scope bookkeeping);
    never for anything a client sent. Nothing here is checked, types included: read a
    claim as ``parse_expiry`` reads ``exp``, with the same rule as a verified one.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


def parse_scope_field(value: Any) -> tuple[str, ...] | None:
    """A token-endpoint reply's ``scope``: space-delimited (RFC 6749 §5.1, §3.3)."""
    if isinstance(value, str):
        return parse_scope_tokens(value)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return None
