"""The trusted issuers of access tokens, and which of them judges a given token.

Each provider (``Settings.token_providers``: the ``oidc`` section's issuer, then the
``providers`` list) owns what trusting it takes: its discovery, its key set with its own
refetch limit, its verified-token cache, its introspection endpoint and cache, and its own
HTTP session when it needs its own TLS trust or a token to fetch keys with (a Kubernetes
API server). A token is judged by one provider only, never by another's keys:

- a JWT by the provider its unverified ``iss`` names (then verified, ``iss`` included);
  an ``iss`` no provider has, or one of a provider the route does not take, is 401
  ``wrong_issuer`` before any key lookup or network call;
- an opaque token (no JWS) by the one introspecting provider the route takes;
- ``validation: introspection`` providers introspect their JWTs too, and so does every
  provider on a route with ``introspect_jwts``.

DPoP proofs are ``auth``'s business; the principal carries the token's binding.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry.trace import Tracer

from gateway.errors import InvalidTokenError
from gateway.idp.discovery import Discovery
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.routing import Route
from gateway.settings import ProviderSettings
from gateway.tokens import jws
from gateway.tokens.introspection import Introspector
from gateway.tokens.jwks import JwksCache
from gateway.tokens.shared import TokenState
from gateway.tokens.validator import TokenValidator, principal_from_claims
from gateway.tracing import NO_TRACER

_NO_PROVIDER = "-"  # the metric label of a token no provider could be picked for


class Provider:
    """One trusted issuer; ``start`` begins its key refresh, ``aclose`` ends everything."""

    def __init__(
        self,
        settings: ProviderSettings,
        idp_http: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        shared: TokenState | None = None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._own_http = _issuer_http(settings)
        http = self._own_http or idp_http
        self.discovery = (
            Discovery(settings, http, tracer) if settings.effective_discovery_url else None
        )
        self.jwks: JwksCache | None = None
        self.validator: TokenValidator | None = None
        if settings.validation == "jwt":
            self.jwks = JwksCache(
                settings,
                self.discovery or Discovery(settings, http, tracer),
                http,
                metrics,
                tracer=tracer,
            )
            self.validator = TokenValidator(settings, self.jwks, metrics, clock, name=self.name)
        self.introspector: Introspector | None = None
        # Introspected tokens' principals, by token, until their answer stops being fresh.
        self._principals: dict[str, tuple[Principal, float]] = {}
        if settings.introspection is not None:
            introspection_shared = shared if settings.introspection.shared_cache else None
            self.introspector = Introspector(
                settings,
                self.discovery,
                http,
                metrics,
                shared=introspection_shared,
                clock=clock,
                tracer=tracer,
            )

    @property
    def ready(self) -> bool:
        return self.jwks is None or self.jwks.ready

    def start(self) -> None:
        if self.jwks is not None:
            self.jwks.start()

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()
        if self.introspector is not None:
            await self.introspector.aclose()
        if self._own_http is not None:
            await self._own_http.close()

    def cached(self, token: str) -> Principal | None:
        return None if self.validator is None else self.validator.cached(token)

    async def validate(self, token: str, *, introspect: bool) -> Principal:
        # A JWS has two dots; anything else is opaque to us (counted in C, no pattern).
        opaque = self.introspector is not None and token.count(".") != 2
        if self.validator is None or opaque:
            return await self._introspected(token)  # every token, or an opaque one
        principal = await self.validator.validate(token)
        if introspect:
            await self._introspected(token)  # active, or it raises; the JWT's claims stand
        return principal

    async def _introspected(self, token: str) -> Principal:
        introspector = self.introspector
        assert introspector is not None  # the settings require one where it is used
        kept = self._principals.get(token)
        now = self._clock()
        if kept is not None:
            if now < kept[1]:
                # The answer is fresh: its principal too (no digest, no claims copied).
                introspector.count_hit()
                return kept[0]
            del self._principals[token]
        claims, fresh_until = await introspector.introspect_until(token)
        settings = self.settings.introspection
        assert settings is not None
        expires_at = None
        if "exp" not in claims:
            # RFC 7662 makes exp optional: such a token stands as long as its answer is kept.
            expires_at = now + settings.cache_ttl_s
        principal = principal_from_claims(claims, token, provider=self.name, expires_at=expires_at)
        if fresh_until > now and settings.cache_size:
            self._principals[token] = (principal, fresh_until)
            if len(self._principals) > settings.cache_size:
                del self._principals[next(iter(self._principals))]
        return principal


class TokenProviders:
    """Owns every provider; picks the one that judges a token for a route."""

    def __init__(self, providers: Sequence[Provider], metrics: Metrics) -> None:
        self._providers = tuple(providers)
        self._metrics = metrics
        self._by_name = {p.name: p for p in self._providers}
        self._by_issuer = {p.settings.issuer: p for p in self._providers if p.settings.issuer}
        self._accepted: dict[frozenset[str], tuple[Provider, ...]] = {}
        self._headers: dict[str, Mapping[str, Any]] = {}  # jws's memo of checked headers

    def __getitem__(self, name: str) -> Provider:
        return self._by_name[name]

    def get(self, name: str) -> Provider | None:
        return self._by_name.get(name)

    @property
    def ready(self) -> bool:
        return all(p.ready for p in self._providers)

    def start(self) -> None:
        for provider in self._providers:
            provider.start()

    async def aclose(self) -> None:
        await asyncio.gather(*(p.aclose() for p in self._providers))

    def cache_hit(self, token: str, route: Route) -> Principal | None:
        """``validate``'s answer without an await when it is a verified-token cache hit of
        the route's only provider (most requests), else None: then ``validate``. A token in
        that cache is a JWT the provider verified, so its validator is what ``validate``
        would ask (``Provider.validate``)."""
        accepted = self._accepted_by(route)
        if len(accepted) == 1 and not route.introspect_jwts:
            validator = accepted[0].validator
            if validator is not None:
                return validator.cache_hit(token)
        return None

    async def validate(self, token: str, route: Route) -> Principal:
        """The principal ``token`` proves on ``route``, or ``InvalidTokenError``."""
        accepted = self._accepted_by(route)
        introspect = route.introspect_jwts
        if len(accepted) == 1:
            only = accepted[0]
            if only.validator is not None:
                # One JWT provider: its validator looks in its cache first and refuses
                # another issuer's token before any key lookup; an opaque token goes to
                # its introspection, if it has one (``Provider.validate``).
                return await only.validate(token, introspect=introspect)
        for provider in accepted:
            if provider.cached(token) is not None:
                return await provider.validate(token, introspect=introspect)
        return await self._pick(token, accepted).validate(token, introspect=introspect)

    def _accepted_by(self, route: Route) -> tuple[Provider, ...]:
        accepted = self._accepted.get(route.providers)
        if accepted is None:
            names = route.providers
            accepted = tuple(p for p in self._providers if not names or p.name in names)
            self._accepted[route.providers] = accepted
        return accepted

    def _pick(self, token: str, accepted: tuple[Provider, ...]) -> Provider:
        try:
            parsed = jws.parse(token, self._headers)
        except InvalidTokenError:
            # No JWS: an opaque token names no issuer. It goes to the route's provider that
            # introspects every token, else to the only one that can introspect at all;
            # never to several (each would learn the token).
            candidates = [p for p in accepted if p.settings.validation == "introspection"]
            candidates = candidates or [p for p in accepted if p.introspector is not None]
            if len(candidates) == 1:
                return candidates[0]
            raise self._refused("malformed", "the token is malformed") from None
        try:
            issuer = jws.unverified_claims(parsed).get("iss")
        except InvalidTokenError as exc:
            raise self._refused(exc.result, exc.description) from None
        found = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if found is None or found not in accepted:
            # SECURITY: never another provider's keys; and no network call for a made-up iss.
            raise self._refused("wrong_issuer", "the token's issuer is not trusted here")
        return found

    def _refused(self, result: str, description: str) -> InvalidTokenError:
        self._metrics.child(self._metrics.token_validations_total, _NO_PROVIDER, result).inc()
        return InvalidTokenError(description, result=result)


def build_providers(
    providers: Sequence[ProviderSettings],
    idp_http: aiohttp.ClientSession,
    metrics: Metrics,
    *,
    shared: TokenState | None = None,
    clock: Callable[[], float] = time.time,
    tracer: Tracer = NO_TRACER,
) -> TokenProviders:
    made = [
        Provider(p, idp_http, metrics, shared=shared, clock=clock, tracer=tracer) for p in providers
    ]
    return TokenProviders(made, metrics)


def _issuer_http(settings: ProviderSettings) -> aiohttp.ClientSession | None:
    """A provider's own session, when it trusts its own CA or fetches with a token."""
    if settings.ca_file is None and settings.fetch_token_file is None:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    middlewares: tuple[Callable[..., Awaitable[aiohttp.ClientResponse]], ...] = ()
    if settings.fetch_token_file is not None:
        middlewares = (_bearer_from_file(Path(settings.fetch_token_file)),)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=8, ssl=context),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        middlewares=middlewares,
    )


def _bearer_from_file(path: Path) -> Callable[..., Awaitable[aiohttp.ClientResponse]]:
    """A client middleware sending the token in ``path``, read for every request: projected
    service-account tokens are rotated on disk by the kubelet."""

    async def send_with_token(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        token = (await asyncio.to_thread(path.read_text, encoding="utf-8")).strip()
        request.headers["Authorization"] = f"Bearer {token}"
        return await handler(request)

    return send_with_token
