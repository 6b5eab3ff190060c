"""JWT access-token validation for one trusted issuer: signature by its keys, then the
registered claims. Which issuer a token is for is ``tokens.providers``'s question.

The algorithm allowlist is explicit; ``jku``, ``x5u`` and embedded ``jwk`` headers are never
read (only ``alg``, ``kid`` and ``typ``). Each caller of ``verify_jwt`` names the kinds of
token (``typ``) it accepts, so an ID, logout or DPoP token is no access token. A bounded
cache of verified tokens, keyed by the token (the principal keeps it anyway, to forward)
and flushed when the key set changes, makes a repeated token cost one dict lookup.
Scope *policy* (what a route requires) is ``auth``'s job; this module only parses scopes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jwt
from jwt.algorithms import Algorithm

from gateway.errors import InvalidTokenError
from gateway.metrics import Metrics
from gateway.principal import Principal, parse_scopes
from gateway.settings import IssuerSettings
from gateway.tokens import jws
from gateway.tokens.jwks import JwksCache


class TokenValidator:
    def __init__(
        self,
        settings: IssuerSettings,
        jwks: JwksCache,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        name: str = "oidc",
    ) -> None:
        self.name = name
        self._settings = settings
        self._jwks = jwks
        self._metrics = metrics
        self._clock = clock
        self._allowed = frozenset(settings.algorithms)
        # pyjwt's algorithm objects, built once: they verify; ``jws`` parses and checks.
        self._algorithms: dict[str, Algorithm] = {
            alg: jwt.get_algorithm_by_name(alg) for alg in settings.algorithms
        }
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._headers: dict[str, Mapping[str, Any]] = {}  # checked JOSE headers, see jws
        self._cache_generation = -1
        self._required = ("exp", "iat", "iss") + (("aud",) if settings.audience else ())
        self._access_types = jws.AT_JWT_TYPES if settings.require_at_jwt else jws.ACCESS_TOKEN_TYPES

    def cache_hit(self, token: str) -> Principal | None:
        """``validate``'s answer when it is a verified-token cache hit (counted as one), else
        None: without an await, for the callers' fast path (``providers``)."""
        self._flush_on_new_keys()
        cached = self._cache.get(token)
        if cached is None:
            return None
        if cached.expires_at + self._settings.leeway_s > self._clock():
            self._metrics.add(self._metrics.token_validations_total, self.name, "valid_cached")
            return cached
        del self._cache[token]
        return None

    async def validate(self, token: str) -> Principal:
        """The principal a token proves, or ``InvalidTokenError`` saying why not."""
        cached = self.cache_hit(token)
        if cached is not None:
            return cached
        try:
            principal = await self._verify(token)
        except InvalidTokenError as exc:
            self._metrics.add(self._metrics.token_validations_total, self.name, exc.result)
            raise
        self._metrics.add(self._metrics.token_validations_total, self.name, "valid")
        self._flush_on_new_keys()  # the key set may have changed while we verified
        if self._settings.token_cache_size:
            self._cache[token] = principal
            if len(self._cache) > self._settings.token_cache_size:
                self._cache.popitem(last=False)
        return principal

    def cached(self, token: str) -> Principal | None:
        """The principal of a token this validator verified and that has not expired."""
        cached = self._cache.get(token)
        if cached is None or cached.expires_at + self._settings.leeway_s <= self._clock():
            return None
        return cached

    def _flush_on_new_keys(self) -> None:
        if self._cache_generation != self._jwks.generation:
            self._cache.clear()  # new keys: a removed key's tokens must be checked again
            self._cache_generation = self._jwks.generation

    async def _verify(self, token: str) -> Principal:
        claims = await self.verify_jwt(
            token,
            audience=self._settings.audience,
            require=self._required,
            token_types=self._access_types,
        )
        return principal_from_claims(claims, token, provider=self.name)

    async def verify_jwt(
        self,
        token: str,
        *,
        audience: tuple[str, ...],
        require: Sequence[str],
        token_types: frozenset[str | None],
    ) -> dict[str, Any]:
        """Any JWT of our issuer (access, ID or logout token, as ``token_types`` says, from
        ``jws``'s ``*_TYPES``): typ, signature, iss, aud, times and claim types."""
        parsed = jws.parse(token, self._headers)
        alg = parsed.header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            # SECURITY: rejects "none" and HS* before any key is looked at.
            raise jws.invalid("bad_algorithm", "the token's algorithm is not allowed")
        # SECURITY: RFC 8725 §3.11; before the key, so a token of the wrong kind cannot make
        # us fetch the key set.
        jws.check_token_type(parsed.header, token_types)
        # Decoded once: read for the issuer first, trusted only once the signature checks.
        claims = jws.unverified_claims(parsed)
        issuer = self._settings.issuer
        if issuer is not None:
            # SECURITY: before the key, so another issuer's token (or a made-up iss) costs
            # no key lookup and no JWKS fetch; checked again, verified, below.
            claimed = claims.get("iss")
            if claimed is None:
                raise jws.invalid("missing_claim", "the token lacks a required claim")
            if claimed != issuer:
                raise jws.invalid("wrong_issuer", "the token has the wrong issuer")
        try:
            key = await self._jwks.get_key(parsed.header.get("kid"), alg)
        except InvalidTokenError as exc:
            exc.result = "unknown_key"
            raise
        jws.check_signature(parsed, self._algorithms[alg], key.key)
        settings = self._settings
        jws.check_claims(
            claims,
            now=self._clock(),
            leeway_s=settings.leeway_s,
            issuer=settings.issuer,
            audience=audience,
            require=tuple(require),
        )
        return claims


def principal_from_claims(
    claims: dict[str, Any], token: str, *, provider: str, expires_at: float | None = None
) -> Principal:
    """The principal of verified claims (a JWT's, or an introspection answer's)."""
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return Principal(
        subject=str(claims.get("sub", "")),
        scopes=parse_scopes(claims),
        claims=claims,
        expires_at=float(claims["exp"]) if expires_at is None else expires_at,
        access_token=token,
        provider=provider,
        # A cnf that is not an object, or a jkt that is no string, binds to no key we could
        # check: such a token is refused by ``auth`` (an empty binding matches no proof).
        dpop_jkt=jkt if isinstance(jkt, str) else ("" if cnf is not None else None),
    )
