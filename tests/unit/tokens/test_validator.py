"""Every way a bearer token is rejected, checked through the gateway: the upstream sees none."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.app import METRICS
from gateway.errors import InvalidTokenError
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.settings import OidcSettings
from gateway.tokens.validator import TokenValidator
from tests.fakes.issuer import FakeIssuer, public_jwk
from tests.fakes.upstream import FakeUpstream


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
async def test_valid_token_of_each_algorithm_reaches_upstream(
    gateway: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str], alg: str
) -> None:
    token = issuer.mint(alg)
    resp = await gateway.get("/api/items", headers=bearer(token))
    assert resp.status == 200
    assert upstream[0].seen[-1].headers["Authorization"] == f"Bearer {token}"


def forged_tokens(issuer: FakeIssuer) -> dict[str, tuple[str, str]]:
    """name -> (token, expected error_description fragment)."""
    rsa = issuer.key("RS256")
    now = int(time.time())
    public_pem = rsa.private.public_key().public_bytes(
        encoding=Encoding.PEM, format=PublicFormat.SubjectPublicKeyInfo
    )
    # The classic confusion: HMAC-sign with the RSA public key's PEM as the secret.
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': rsa.kid})}.{b64(issuer.claims())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    hs_confusion = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    none_token = f"{b64({'alg': 'none', 'kid': rsa.kid})}.{b64(issuer.claims())}."
    valid = issuer.mint()
    head, _payload, sig = valid.split(".")
    tampered = ".".join((head, b64(issuer.claims(sub="mallory")), sig))
    stranger = issuer.add_key("RS256", kid="stranger")
    issuer.keys.remove(stranger)  # signed by a key the issuer never published
    return {
        "none": (none_token, "algorithm"),
        "hs_rs_confusion": (hs_confusion, "algorithm"),
        "unknown_kid": (issuer.mint(key=stranger), "signing key is unknown"),
        "expired": (issuer.mint(exp=now - 120, iat=now - 600), "expired"),
        "not_yet_valid": (issuer.mint(nbf=now + 600), "not yet valid"),
        "issued_in_future": (issuer.mint(iat=now + 600), "not yet valid"),
        "wrong_issuer": (issuer.mint(iss="https://evil.example"), "issuer"),
        "wrong_audience": (issuer.mint(aud="https://other.example"), "audience"),
        "no_exp": (issuer.mint(exp=None), "lacks a required claim"),
        "exp_as_string": (issuer.mint(exp=str(now + 300)), "exp claim is invalid"),
        "sub_not_a_string": (issuer.mint(sub=5), "sub claim is not a string"),
        "logout_token": (issuer.mint(headers={"typ": "logout+jwt"}), "kind expected"),
        "dpop_proof": (issuer.mint(headers={"typ": "dpop+jwt"}), "kind expected"),
        "tampered": (tampered, "signature"),
        "malformed": ("not.a.jwt", "malformed"),
        "garbage": ("abc", "malformed"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "none",
        "hs_rs_confusion",
        "unknown_kid",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "wrong_issuer",
        "wrong_audience",
        "no_exp",
        "exp_as_string",
        "sub_not_a_string",
        "logout_token",
        "dpop_proof",
        "tampered",
        "malformed",
        "garbage",
    ],
)
async def test_invalid_token_is_401_and_never_reaches_upstream(
    gateway: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str], case: str
) -> None:
    token, fragment = forged_tokens(issuer)[case]
    resp = await gateway.get("/api/items", headers=bearer(token))
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "invalid_token"
    assert fragment in body["error_description"]
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    assert token not in json.dumps(body)
    assert token not in challenge
    assert upstream[0].seen == []


async def test_audience_may_be_an_array(gateway: TestClient[Any, Any], issuer: FakeIssuer) -> None:
    token = issuer.mint(aud=["https://other.example", "https://api.example.test"])
    assert (await gateway.get("/api/x", headers=bearer(token))).status == 200


async def test_missing_scope_is_403_with_required_scope(
    gateway: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    resp = await gateway.get("/api/admin/x", headers=bearer(issuer.mint(scope="api.read")))
    assert resp.status == 403
    assert (await resp.json())["error"] == "insufficient_scope"
    assert 'scope="api.admin"' in resp.headers["WWW-Authenticate"]
    assert upstream[0].seen == []


async def test_scp_array_grants_scopes(gateway: TestClient[Any, Any], issuer: FakeIssuer) -> None:
    token = issuer.mint(scope=None, scp=["api.admin"])
    assert (await gateway.get("/api/admin/x", headers=bearer(token))).status == 200


async def test_a_scope_joined_by_a_no_break_space_is_not_two_scopes(
    gateway: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    # RFC 6749 §3.3: scope-tokens are separated by U+0020 only.
    token = issuer.mint(scope="api.read\u00a0api.admin")
    resp = await gateway.get("/api/admin/x", headers=bearer(token))
    assert resp.status == 403
    assert upstream[0].seen == []
    token = issuer.mint(scope="api.read  api.admin")
    assert (await gateway.get("/api/admin/x", headers=bearer(token))).status == 200


async def test_an_access_token_typed_at_jwt_reaches_upstream(
    gateway: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    token = issuer.mint(headers={"typ": "at+jwt"})
    assert (await gateway.get("/api/x", headers=bearer(token))).status == 200


async def test_missing_token_is_401_without_error_code(
    gateway: TestClient[Any, Any], upstream: tuple[FakeUpstream, str]
) -> None:
    resp = await gateway.get("/api/x")
    assert resp.status == 401
    # RFC 6750 §3.1: no error code; and DPoP's challenge beside it (RFC 9449 §7.1)
    assert resp.headers["WWW-Authenticate"] == 'Bearer, DPoP algs="ES256 ES384 EdDSA PS256 RS256"'
    resp = await gateway.get("/api/x", headers={"Authorization": "Basic YTpi"})
    assert resp.status == 401
    assert upstream[0].seen == []


async def test_token_in_query_string_is_ignored(
    gateway: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    resp = await gateway.get("/api/x", params={"access_token": issuer.mint()})
    assert resp.status == 401
    assert upstream[0].seen == []


async def test_scheme_is_case_insensitive(
    gateway: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    resp = await gateway.get("/api/x", headers={"Authorization": f"bEaReR {issuer.mint()}"})
    assert resp.status == 200


async def test_jku_x5u_and_embedded_jwk_headers_are_ignored(
    gateway: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    attacker = issuer.add_key("RS256", kid="attacker")
    issuer.keys.remove(attacker)
    token = issuer.mint(
        key=attacker,
        headers={
            "jku": "https://evil.example/jwks",
            "x5u": "https://evil.example/cert",
            "jwk": public_jwk(attacker.private, "attacker", "RS256"),
        },
    )
    resp = await gateway.get("/api/x", headers=bearer(token))
    assert resp.status == 401


async def test_repeated_token_is_verified_once(
    gateway: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    token = issuer.mint()
    for _ in range(5):
        assert (await gateway.get("/api/x", headers=bearer(token))).status == 200
    metrics = gateway.app[METRICS].render().decode()
    assert 'tokengate_token_validations_total{provider="oidc",result="valid"} 1.0' in metrics
    assert 'tokengate_token_validations_total{provider="oidc",result="valid_cached"} 4.0' in metrics


async def test_cached_token_still_expires(issuer: FakeIssuer) -> None:
    """The verified-token cache never outlives the token's exp (+ leeway)."""
    now = [1000.0]

    class Keys:
        generation = 1

        async def get_key(self, kid: str | None, alg: str) -> Any:
            raise AssertionError("a cached token must not look up keys")

    validator = TokenValidator(
        OidcSettings(issuer="https://idp.example", leeway_s=10),
        Keys(),
        Metrics(),  # type: ignore[arg-type]
        clock=lambda: now[0],
    )
    principal = Principal("alice", frozenset(), {}, expires_at=1005.0, access_token="t")
    validator._cache_generation = 1
    validator._cache["t"] = principal
    assert await validator.validate("t") is principal
    now[0] = 1016.0
    with pytest.raises(InvalidTokenError):  # re-verified, not served from the cache
        await validator.validate("t")


def test_a_cache_hit_without_an_await_still_drops_tokens_of_old_keys() -> None:
    """``cache_hit`` (the auth fast path, no await) answers as ``validate`` would: a token
    verified before the key set changed is not served from the cache afterwards."""

    class Keys:
        generation = 1

    validator = TokenValidator(
        OidcSettings(issuer="https://idp.example"),
        Keys(),  # type: ignore[arg-type]
        Metrics(),
        clock=lambda: 1000.0,
    )
    principal = Principal("alice", frozenset(), {}, expires_at=2000.0, access_token="t")
    validator._cache_generation = 1
    validator._cache["t"] = principal
    assert validator.cache_hit("t") is principal
    assert validator.cache_hit("other") is None
    Keys.generation = 2  # a refetch brought another key set
    assert validator.cache_hit("t") is None
