"""The issuer's signing keys (JWKS), fetched at start-up and kept fresh.

An unknown ``kid`` triggers a refetch, at most one per ``jwks_refetch_interval_s`` whatever
the traffic; a periodic refresh honours ``Cache-Control: max-age``; a failed fetch keeps the
previous key set. ``generation`` changes whenever the key set does, so the validator can
flush the tokens it verified with old keys. Validation itself is ``tokens.validator``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from opentelemetry.trace import SpanKind, Tracer

from gateway.errors import InvalidTokenError
from gateway.idp.discovery import Discovery
from gateway.idp.tokens import IdpUnavailable
from gateway.metrics import Metrics
from gateway.settings import IssuerSettings
from gateway.single_flight import SingleFlight
from gateway.tracing import NO_TRACER

log = logging.getLogger(__name__)

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)
_MIN_REFRESH_S = 60.0
_MAX_BACKOFF_S = 30.0
# SECURITY: which algorithms a key of each type may verify (RFC 7518 §3.1, RFC 8037).
_ALGS_FOR_KEY: Mapping[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    algorithms: frozenset[str]
    key: Any  # a cryptography public key object

    @classmethod
    def parse(cls, jwk: Mapping[str, Any]) -> SigningKey | None:
        """A verification key from one JWK, or None for keys we must not use."""
        if jwk.get("use", "sig") != "sig":
            return None
        kty = jwk.get("kty")
        crv = jwk.get("crv") if kty != "RSA" else None
        allowed = _ALGS_FOR_KEY.get((str(kty), crv))
        if allowed is None:
            return None  # symmetric ("oct") or unknown keys are never accepted
        declared = jwk.get("alg")
        if declared is not None:
            if declared not in allowed:
                return None
            allowed = frozenset({declared})
        try:
            key = jwt.PyJWK.from_dict(dict(jwk)).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            return None
        kid = jwk.get("kid")
        return cls(kid=kid if isinstance(kid, str) else None, algorithms=allowed, key=key)


def parse_jwks(data: Any) -> tuple[SigningKey, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise IdpUnavailable("the JWKS document has no 'keys' array")
    keys = tuple(k for jwk in data["keys"] if isinstance(jwk, dict) if (k := SigningKey.parse(jwk)))
    if not keys:
        raise IdpUnavailable("the JWKS document has no usable signing key")
    return keys


def parse_max_age(cache_control: str | None, default_s: float) -> float:
    """Seconds until the next periodic refresh, from ``Cache-Control`` (clamped)."""
    if cache_control:
        match = _MAX_AGE.search(cache_control)
        if match:
            return min(max(float(match.group(1)), _MIN_REFRESH_S), default_s)
    return default_s


class JwksCache:
    """Owns the key set and the background task that keeps it fresh (``aclose`` stops it)."""

    def __init__(
        self,
        settings: IssuerSettings,
        discovery: Discovery,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._settings = settings
        self._discovery = discovery
        self._http = http
        self._metrics = metrics
        self._clock = clock
        self._by_kid: dict[str, SigningKey] = {}
        self._keys: tuple[SigningKey, ...] = ()
        self._fingerprint: object = None
        self._last_kid_refetch_at = -float("inf")
        self._fetches: SingleFlight[None, float] = SingleFlight("jwks-fetch")
        self._refresher: asyncio.Task[None] | None = None
        self.generation = 0
        self.next_refresh_in_s = settings.jwks_max_age_s

    @property
    def ready(self) -> bool:
        return bool(self._keys)

    def start(self) -> None:
        """Start the periodic refresh; the first fetch happens at once."""
        self._refresher = asyncio.create_task(self._keep_fresh(), name="jwks-refresh")

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            # A fetch that already failed has nothing left to report at shutdown.
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        await self._fetches.aclose()

    async def get_key(self, kid: str | None, alg: str) -> SigningKey:
        key = self._lookup(kid, alg)
        if key is not None:
            return key
        # An unknown kid may be a rotation at the issuer: refetch, but at most once per
        # interval so a flood of forged kids cannot turn us into a DoS on the IdP.
        # Only these refetches count against the interval: the periodic refresh must not
        # delay the first token signed with a just-rotated key.
        if self._fetches.running(None) is None:
            now = self._clock()
            if now - self._last_kid_refetch_at < self._settings.jwks_refetch_interval_s:
                raise InvalidTokenError("the token's signing key is unknown")
            self._last_kid_refetch_at = now
        with contextlib.suppress(IdpUnavailable):
            await self.refresh()
        key = self._lookup(kid, alg)
        if key is None:
            raise InvalidTokenError("the token's signing key is unknown")
        return key

    async def refresh(self) -> float:
        """Fetch the key set now, joining a fetch already under way; returns its max-age."""
        return await self._fetches.join(None, self._fetch)

    def _lookup(self, kid: str | None, alg: str) -> SigningKey | None:
        if kid is not None:
            key = self._by_kid.get(kid)
        else:
            # No kid: only unambiguous when exactly one key can verify this algorithm.
            candidates = [k for k in self._keys if alg in k.algorithms]
            key = candidates[0] if len(candidates) == 1 else None
        return key if key is not None and alg in key.algorithms else None

    async def _fetch(self) -> float:
        with self._tracer.start_as_current_span("jwks fetch", kind=SpanKind.CLIENT):
            return await self._fetch_keys()

    async def _fetch_keys(self) -> float:
        try:
            metadata = await self._discovery.load()
            async with self._http.get(
                metadata.jwks_uri, timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise IdpUnavailable(f"JWKS answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
                cache_control = resp.headers.get("Cache-Control")
            keys = parse_jwks(data)
        except (aiohttp.ClientError, TimeoutError, ValueError, IdpUnavailable) as exc:
            self._metrics.jwks_fetch_total.labels(result="error").inc()
            log.warning("jwks_fetch", extra={"result": "error", "error_type": type(exc).__name__})
            if isinstance(exc, IdpUnavailable):
                raise
            raise IdpUnavailable("the JWKS could not be fetched") from exc
        fingerprint = repr(sorted(repr(k) for k in data["keys"]))
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._keys = keys
            self._by_kid = {k.kid: k for k in keys if k.kid is not None}
            self.generation += 1
        self._metrics.jwks_fetch_total.labels(result="success").inc()
        log.info("jwks_fetch", extra={"result": "success", "keys": len(keys)})
        return parse_max_age(cache_control, self._settings.jwks_max_age_s)

    async def _keep_fresh(self) -> None:
        backoff_s = 1.0
        while True:
            try:
                delay_s = await self.refresh()
                backoff_s = 1.0
            except IdpUnavailable:
                delay_s, backoff_s = backoff_s, min(backoff_s * 2, _MAX_BACKOFF_S)
            self.next_refresh_in_s = delay_s
            await asyncio.sleep(delay_s)
