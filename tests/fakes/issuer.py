"""A fake OpenID issuer: discovery and a JWKS with RS256, PS256, ES256 and EdDSA keys.

It mints real signed JWTs, rotates keys on demand and counts JWKS fetches, so tests count
effects where they happen (at the issuer), not inside tokengate.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

AUDIENCE = "https://api.example.test"


def _private_key(alg: str) -> Any:
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


@functools.cache
def _default_key(alg: str) -> Any:
    # RSA key generation costs ~50 ms; the default keys are shared by every test's issuer.
    return _private_key(alg)


def public_jwk(private_key: Any, kid: str, alg: str | None) -> dict[str, Any]:
    algo = jwt.get_algorithm_by_name(alg or "RS256")
    jwk = json.loads(algo.to_jwk(private_key.public_key()))
    jwk["kid"] = kid
    jwk["use"] = "sig"
    if alg is not None:
        jwk["alg"] = alg
    return jwk


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any


@dataclass
class FakeIssuer:
    """Serve with ``web_app()``; ``url`` is set by the fixture once it listens."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    jwks_fetches: int = 0
    cache_control: str | None = None
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for alg in ("RS256", "PS256", "ES256", "EdDSA"):
            self.keys.append(SigningKey(f"{alg.lower()}-default", alg, _default_key(alg)))

    def add_key(self, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        key = SigningKey(kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", alg, _private_key(alg))
        self.keys.append(key)
        return key

    def key(self, alg: str = "RS256") -> SigningKey:
        return next(k for k in self.keys if k.alg == alg)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
            "scope": "api.read api.write",
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        alg: str = "RS256",
        *,
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.key(alg)
        hdr = {"kid": key.kid, **(headers or {})}
        return jwt.encode(self.claims(**claims), key.private, algorithm=alg, headers=hdr)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(k.private, k.kid, k.alg) for k in self.keys] + self.extra_jwks}

    def web_app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "issuer": self.url,
                    "jwks_uri": f"{self.url}/jwks",
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                }
            )

        async def jwks(request: web.Request) -> web.Response:
            self.jwks_fetches += 1
            headers = {"Cache-Control": self.cache_control} if self.cache_control else None
            return web.json_response(self.jwks(), headers=headers)

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        return app
