"""JWT access-token validation: signature by the issuer's keys, then the registered claims.

The algorithm allowlist is explicit; ``jku``, ``x5u`` and embedded ``jwk`` headers are never
read (only ``alg`` and ``kid``). A bounded cache of verified tokens, keyed by a digest of the
token and flushed when the key set changes, makes a repeated token cost one dict lookup.
Scope *policy* (what a route requires) is ``auth``'s job; this module only parses scopes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt

from gateway.errors import InvalidTokenError
from gateway.metrics import Metrics
from gateway.principal import Principal, parse_scopes
from gateway.settings import OidcSettings
from gateway.tokens.jwks import JwksCache

# pyjwt's exceptions, mapped to a description a client may see (RFC 6750 §3).
_DESCRIPTIONS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "the token is not yet valid"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token has the wrong issuer"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token has the wrong audience"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature is invalid"),
    (jwt.InvalidIssuedAtError, "bad_iat", "the token's iat claim is invalid"),
    (jwt.DecodeError, "malformed", "the token is malformed"),
)


class TokenValidator:
    def __init__(
        self,
        settings: OidcSettings,
        jwks: JwksCache,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._jwks = jwks
        self._metrics = metrics
        self._clock = clock
        self._allowed = frozenset(settings.algorithms)
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._cache_generation = -1
        self._required = ["exp", "iat", "iss"] + (["aud"] if settings.audience else [])

    async def validate(self, token: str) -> Principal:
        """The principal a token proves, or ``InvalidTokenError`` saying why not."""
        digest = hashlib.blake2b(token.encode(), digest_size=20).digest()
        self._flush_on_new_keys()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.expires_at + self._settings.leeway_s > self._clock():
                self._metrics.child(self._metrics.token_validations_total, "valid_cached").inc()
                return cached
            del self._cache[digest]
        try:
            principal = await self._verify(token)
        except InvalidTokenError as exc:
            self._metrics.token_validations_total.labels(result=exc.result).inc()
            raise
        self._metrics.child(self._metrics.token_validations_total, "valid").inc()
        self._flush_on_new_keys()  # the key set may have changed while we verified
        if self._settings.token_cache_size:
            self._cache[digest] = principal
            if len(self._cache) > self._settings.token_cache_size:
                self._cache.popitem(last=False)
        return principal

    def _flush_on_new_keys(self) -> None:
        if self._cache_generation != self._jwks.generation:
            self._cache.clear()  # new keys: a removed key's tokens must be checked again
            self._cache_generation = self._jwks.generation

    async def _verify(self, token: str) -> Principal:
        claims = await self.verify_jwt(
            token, audience=self._settings.audience, require=self._required
        )
        return principal_from_claims(claims, token)

    async def verify_jwt(
        self, token: str, *, audience: tuple[str, ...], require: list[str]
    ) -> dict[str, Any]:
        """Any JWT of our issuer (access, ID or logout token): signature, iss, aud, times."""
        header = parse_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            # SECURITY: rejects "none" and HS* before any key is looked at.
            raise _invalid("bad_algorithm", "the token's algorithm is not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("malformed", "the token is malformed")
        try:
            key = await self._jwks.get_key(kid, alg)
        except InvalidTokenError as exc:
            exc.result = "unknown_key"
            raise
        settings = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(audience) or None,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={
                    "require": require,
                    "verify_aud": bool(audience),
                    "verify_iss": settings.issuer is not None,
                },
            )
        except jwt.PyJWTError as exc:
            for kind, result, description in _DESCRIPTIONS:
                if isinstance(exc, kind):
                    raise _invalid(result, description) from None
            raise _invalid("invalid", "the token is invalid") from None
        if not isinstance(claims.get("sub", ""), str):
            raise _invalid("malformed", "the token's sub claim is not a string")
        return claims


def parse_header(token: str) -> dict[str, Any]:
    """The JOSE header alone (RFC 7515 §7.1): pyjwt's own helper decodes the whole token,
    and ``jwt.decode`` does it again, so the header is read here once, cheaply."""
    head, dot, _ = token.partition(".")
    if not dot:
        raise _invalid("malformed", "the token is malformed")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        raise _invalid("malformed", "the token is malformed") from None
    if not isinstance(header, dict):
        raise _invalid("malformed", "the token is malformed")
    return header


def principal_from_claims(claims: dict[str, Any], token: str) -> Principal:
    return Principal(
        subject=str(claims.get("sub", "")),
        scopes=parse_scopes(claims),
        claims=claims,
        expires_at=float(claims["exp"]),
        access_token=token,
    )


def _invalid(result: str, description: str) -> InvalidTokenError:
    return InvalidTokenError(description, result=result)
