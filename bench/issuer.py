"""The benchmark's token issuer: discovery document, JWKS, refresh grants, minted tokens.

The driver generates an RSA key (:meth:`Issuer.generate`), writes it as PEM, starts this
module as a process (``python bench/issuer.py --key key.pem --port N
[--token-latency-ms 50]``) that serves on 127.0.0.1:

- ``/.well-known/openid-configuration`` and ``/jwks.json``;
- ``POST /token``: ``grant_type=refresh_token`` for ``client_id`` :data:`CLIENT_ID` (client
  auth ``none``), answered after ``--token-latency-ms`` with a new access token
  (``expires_in`` :data:`ACCESS_LIFETIME_S`) and a new refresh token. Refresh tokens
  rotate: each is good once, a second use answers ``invalid_grant`` (the driver's seeded
  refresh tokens are accepted the first time they are seen);
- ``GET /__stats``: grants answered, grants rejected, and the time each grant spent in
  the ``/token`` handler (the IdP's own token latency, in ms).

The driver mints tokens in-process with :meth:`Issuer.mint` (RS256, ``iss``/``aud``/
``exp``/``scope``).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

AUDIENCE = "https://api.bench.test"
SCOPE = "api.read api.write"
KID = "bench-1"
CLIENT_ID = "tokengate-bench"  # tokengate's oidc.client_id, client_auth none
ACCESS_LIFETIME_S = 3600  # expires_in of a refreshed access token
_TEN_YEARS_S = 10 * 365 * 86400
_KEPT_DURATIONS = 10_000  # /__stats keeps the handler time of the latest grants


class Issuer:
    def __init__(self, key: rsa.RSAPrivateKey, url: str) -> None:
        self.key = key
        self.url = url.rstrip("/")

    @classmethod
    def generate(cls, url: str) -> Issuer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), url)

    @classmethod
    def load(cls, pem_path: Path, url: str) -> Issuer:
        key = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls(key, url)

    def write_pem(self, path: Path) -> None:
        path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/jwks.json",
            "token_endpoint": f"{self.url}/token",
            "token_endpoint_auth_methods_supported": ["none"],
            "grant_types_supported": ["refresh_token"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=KID, use="sig", alg="RS256")
        return {"keys": [jwk]}

    def mint(self, subject: str = "bench-user", lifetime_s: int = _TEN_YEARS_S) -> str:
        """An RS256 access token; a negative ``lifetime_s`` mints one that has expired."""
        now = int(time.time())
        exp = now + lifetime_s
        claims = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": subject,
            "scope": SCOPE,
            "iat": min(now, exp - 3600),
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})


def main() -> None:
    import uvloop
    from aiohttp import web

    parser = argparse.ArgumentParser(description="serve an issuer's discovery, JWKS, /token")
    parser.add_argument("--key", type=Path, required=True, help="PEM private key")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--token-latency-ms",
        type=float,
        default=0.0,
        help="artificial delay of every /token answer (default 0)",
    )
    args = parser.parse_args()
    issuer = Issuer.load(args.key, f"http://127.0.0.1:{args.port}")
    discovery, jwks = issuer.discovery(), issuer.jwks()
    delay_s = max(0.0, args.token_latency_ms / 1000)
    redeemed: set[str] = set()  # refresh tokens used once: rotation
    stats: dict[str, Any] = {"grants": {"refresh_token": 0}, "rejected": 0}
    durations_ms: deque[float] = deque(maxlen=_KEPT_DURATIONS)

    async def get_discovery(request: web.Request) -> web.Response:
        return web.json_response(discovery)

    async def get_jwks(request: web.Request) -> web.Response:
        return web.json_response(jwks, headers={"Cache-Control": "max-age=3600"})

    def token_error(status: int, error: str) -> web.Response:
        stats["rejected"] += 1
        return web.json_response({"error": error}, status=status)

    async def post_token(request: web.Request) -> web.Response:
        started = time.perf_counter()
        form = await request.post()
        if form.get("grant_type") != "refresh_token":
            return token_error(400, "unsupported_grant_type")
        if form.get("client_id") != CLIENT_ID:
            return token_error(401, "invalid_client")
        refresh_token = form.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token or refresh_token in redeemed:
            return token_error(400, "invalid_grant")
        redeemed.add(refresh_token)  # rotation: never good twice
        if delay_s:
            await asyncio.sleep(delay_s)
        body = {
            "access_token": issuer.mint("bench-refreshed", ACCESS_LIFETIME_S),
            "token_type": "Bearer",
            "expires_in": ACCESS_LIFETIME_S,
            "refresh_token": "rt-" + secrets.token_urlsafe(32),
            "scope": SCOPE,
        }
        stats["grants"]["refresh_token"] += 1
        durations_ms.append((time.perf_counter() - started) * 1000)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response({**stats, "token_ms": list(durations_ms)})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", get_discovery)
    app.router.add_get("/jwks.json", get_jwks)
    app.router.add_post("/token", post_token)
    app.router.add_get("/__stats", get_stats)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        backlog=1024,
        shutdown_timeout=1.0,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
