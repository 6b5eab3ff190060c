"""OpenID Connect Discovery 1.0: fetch and check the provider's metadata once, on demand.

The metadata is cached for the life of the process (endpoints do not move under a running
deployment); a failed fetch is retried by the next caller. Failures are ``IdpUnavailable``,
the ``idp`` package's own; ``bff`` and ``sessions`` decide what a client sees. Keys are
``tokens.jwks``'s job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from opentelemetry.trace import SpanKind, Tracer

from gateway.idp.tokens import IdpUnavailable
from gateway.settings import IssuerSettings
from gateway.tracing import NO_TRACER

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    jwks_uri: str
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    revocation_endpoint: str | None = None
    introspection_endpoint: str | None = None
    end_session_endpoint: str | None = None
    userinfo_endpoint: str | None = None

    @classmethod
    def parse(cls, data: Any, expected_issuer: str | None) -> ProviderMetadata:
        if not isinstance(data, dict):
            raise IdpUnavailable("discovery document is not a JSON object")
        issuer = data.get("issuer")
        jwks_uri = data.get("jwks_uri")
        if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
            raise IdpUnavailable("discovery document lacks issuer or jwks_uri")
        # OIDC Discovery §4.3: the issuer in the document must equal the one configured,
        # or an attacker-controlled document could vouch for foreign tokens.
        if expected_issuer is not None and issuer.rstrip("/") != expected_issuer.rstrip("/"):
            raise IdpUnavailable("discovery issuer does not match oidc.issuer")

        def opt(name: str) -> str | None:
            value = data.get(name)
            return value if isinstance(value, str) else None

        return cls(
            issuer=issuer,
            jwks_uri=jwks_uri,
            authorization_endpoint=opt("authorization_endpoint"),
            token_endpoint=opt("token_endpoint"),
            revocation_endpoint=opt("revocation_endpoint"),
            introspection_endpoint=opt("introspection_endpoint"),
            end_session_endpoint=opt("end_session_endpoint"),
            userinfo_endpoint=opt("userinfo_endpoint"),
        )


class Discovery:
    """Owns the provider metadata; ``load`` fetches it once, concurrent callers share it."""

    def __init__(
        self, settings: IssuerSettings, http: aiohttp.ClientSession, tracer: Tracer = NO_TRACER
    ) -> None:
        self._tracer = tracer
        self._settings = settings
        self._http = http
        self._metadata: ProviderMetadata | None = None
        self._lock = asyncio.Lock()

    async def load(self) -> ProviderMetadata:
        if self._metadata is not None:
            return self._metadata
        async with self._lock:
            if self._metadata is None:
                with self._tracer.start_as_current_span("discovery", kind=SpanKind.CLIENT):
                    self._metadata = await self._fetch()
        return self._metadata

    async def _fetch(self) -> ProviderMetadata:
        settings = self._settings
        url = settings.effective_discovery_url
        if url is None:
            if settings.jwks_uri is None:
                raise IdpUnavailable("neither oidc.issuer nor oidc.jwks_uri is configured")
            return ProviderMetadata(issuer=settings.issuer or "", jwks_uri=settings.jwks_uri)
        try:
            async with self._http.get(
                url, timeout=aiohttp.ClientTimeout(total=settings.timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise IdpUnavailable(f"discovery answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("discovery_failed", extra={"error_type": type(exc).__name__})
            raise IdpUnavailable(
                "the identity provider's discovery document is unavailable"
            ) from exc
        metadata = ProviderMetadata.parse(data, settings.issuer)
        if settings.jwks_uri:
            metadata = dataclasses.replace(metadata, jwks_uri=settings.jwks_uri)
        log.info("discovery", extra={"issuer": metadata.issuer})
        return metadata
