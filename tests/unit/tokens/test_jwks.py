"""The JWKS cache: rotation without restart, a rate-limited refetch, stale keys on failure."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admin import Readiness, build_admin_app
from gateway.app import PROVIDERS, build_app
from gateway.errors import InvalidTokenError
from gateway.idp.discovery import Discovery
from gateway.idp.tokens import IdpUnavailable
from gateway.metrics import Metrics
from gateway.settings import OidcSettings, parse_settings
from gateway.tokens.jwks import JwksCache, parse_jwks, parse_max_age
from tests.fakes.issuer import FakeIssuer, SigningKey


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_new_kid_at_the_issuer_is_accepted_without_restart(
    gateway: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    assert (await gateway.get("/api/x", headers=bearer(issuer.mint()))).status == 200
    fetches = issuer.jwks_fetches
    rotated = issuer.add_key("RS256", kid="rotated-2026")
    resp = await gateway.get("/api/x", headers=bearer(issuer.mint(key=rotated)))
    assert resp.status == 200
    assert issuer.jwks_fetches == fetches + 1


async def test_unknown_kid_flood_triggers_one_refetch_per_interval(
    gateway: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    assert (await gateway.get("/api/x", headers=bearer(issuer.mint()))).status == 200
    fetches = issuer.jwks_fetches
    stranger = issuer.add_key("RS256", kid="stranger")
    issuer.keys.remove(stranger)
    forged = [
        issuer.mint(key=SigningKey(f"forged-{i}", "RS256", stranger.private)) for i in range(50)
    ]
    responses = await asyncio.gather(*(gateway.get("/api/x", headers=bearer(t)) for t in forged))
    assert [r.status for r in responses] == [401] * 50
    assert issuer.jwks_fetches == fetches + 1


@pytest.fixture
async def cache_parts(issuer: FakeIssuer) -> Any:
    async with aiohttp.ClientSession() as http:
        settings = OidcSettings(issuer=issuer.url, jwks_refetch_interval_s=30)
        now = [0.0]
        cache = JwksCache(
            settings, Discovery(settings, http), http, Metrics(), clock=lambda: now[0]
        )
        yield cache, now
        await cache.aclose()


async def test_refetch_allowed_again_after_the_interval(
    cache_parts: Any, issuer: FakeIssuer
) -> None:
    cache, now = cache_parts
    await cache.refresh()
    first = issuer.add_key("ES256", kid="first")
    now[0] = 100.0  # the first unknown kid refetches at once: a rotation must not wait
    assert (await cache.get_key("first", "ES256")).kid == first.kid
    assert issuer.jwks_fetches == 2
    issuer.add_key("ES256", kid="second")
    now[0] = 110.0  # within the interval of that refetch: the next unknown kid waits
    with pytest.raises(InvalidTokenError):
        await cache.get_key("second", "ES256")
    assert issuer.jwks_fetches == 2
    now[0] = 131.0
    assert (await cache.get_key("second", "ES256")).kid == "second"
    assert issuer.jwks_fetches == 3


async def test_failed_fetch_keeps_previous_keys(cache_parts: Any, issuer: FakeIssuer) -> None:
    cache, _now = cache_parts
    await cache.refresh()
    generation = cache.generation
    original_jwks = issuer.jwks
    issuer.jwks = lambda: {"nope": []}  # type: ignore[method-assign]
    with pytest.raises(IdpUnavailable):
        await cache.refresh()
    issuer.jwks = original_jwks  # type: ignore[method-assign]
    assert cache.ready
    assert cache.generation == generation
    key = await cache.get_key(issuer.key("EdDSA").kid, "EdDSA")
    assert "EdDSA" in key.algorithms


async def test_key_refuses_an_algorithm_of_another_family(
    cache_parts: Any, issuer: FakeIssuer
) -> None:
    cache, _ = cache_parts
    await cache.refresh()
    with pytest.raises(InvalidTokenError):
        await cache.get_key(issuer.key("RS256").kid, "ES256")


def test_symmetric_encryption_and_mismatched_keys_are_never_used(issuer: FakeIssuer) -> None:
    rsa_jwk = issuer.jwks()["keys"][0]
    keys = parse_jwks(
        {
            "keys": [
                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                {**rsa_jwk, "use": "enc", "kid": "enc"},
                {**rsa_jwk, "alg": "ES256", "kid": "lying-alg"},
                {**rsa_jwk, "kid": "good"},
            ]
        }
    )
    assert [k.kid for k in keys] == ["good"]
    with pytest.raises(IdpUnavailable):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]})


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 3600.0),
        ("max-age=600", 600.0),
        ("public, max-age=5", 60.0),
        ("max-age=99999", 3600.0),
        ("no-cache", 3600.0),
    ],
)
def test_max_age_is_honoured_and_clamped(header: str | None, expected: float) -> None:
    assert parse_max_age(header, 3600.0) == expected


async def test_not_ready_until_keys_are_loaded(aiohttp_client: Any, issuer: FakeIssuer) -> None:
    readiness = Readiness()
    metrics = Metrics()
    published = issuer.keys
    issuer.keys = []  # the issuer answers, but with no usable key yet
    app = build_app(
        parse_settings({"oidc": {"issuer": issuer.url}}), metrics=metrics, readiness=readiness
    )
    await aiohttp_client(app)
    admin = await aiohttp_client(build_admin_app(readiness, metrics))
    with pytest.raises(IdpUnavailable):
        await oidc_jwks(app).refresh()
    assert (await admin.get("/readyz")).status == 503
    issuer.keys = published
    await oidc_jwks(app).refresh()
    resp = await admin.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"accepting": True, "keys": True}


def oidc_jwks(app: web.Application) -> JwksCache:
    jwks = app[PROVIDERS]["oidc"].jwks
    assert jwks is not None
    return jwks
