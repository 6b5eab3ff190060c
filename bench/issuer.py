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
- ``POST /introspect`` (RFC 7662), client authentication ``client_secret_basic`` as
  :data:`INTROSPECTION_CLIENT_ID` / :data:`INTROSPECTION_CLIENT_SECRET`: an opaque token
  this issuer minted (:meth:`Issuer.mint_opaque`) is active (``iss``, ``aud``, ``sub``,
  ``scope``, ``client_id``, ``exp`` an hour after the call, ``iat``), anything else is
  ``{"active": false}``;
- ``GET /__stats``: grants answered, grants rejected, the time each grant spent in
  the ``/token`` handler (the IdP's own token latency, in ms), and introspection calls
  (active, inactive, refused for client authentication).

The driver mints tokens in-process with :meth:`Issuer.mint` (RS256, ``iss``/``aud``/
``exp``/``scope``, and ``cnf`` for a DPoP-bound one) and :meth:`Issuer.mint_opaque`. An
opaque token is a random part and its HMAC under a secret derived from the issuer's key,
so the issuer process knows its own tokens without being told each one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from procs import serve_on_loopback

AUDIENCE = "https://api.bench.test"
SCOPE = "api.read api.write"
KID = "bench-1"
CLIENT_ID = "tokengate-bench"  # tokengate's oidc.client_id, client_auth none
# tokengate's oidc.introspection client (client_secret_basic); loopback-only bench values.
INTROSPECTION_CLIENT_ID = "tokengate-introspect"
INTROSPECTION_CLIENT_SECRET = "bench-introspection-secret"  # noqa: S105 - a fixed bench value
INTROSPECTION_LIFETIME_S = 3600  # exp of an active answer: an hour after the call
_OPAQUE_RANDOM_BYTES = 32  # token_urlsafe(32): 43 characters
_OPAQUE_TAG_BYTES = 16  # then 22 characters of HMAC: 65 in all, no dot (no JWS)
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

    @property
    def _opaque_secret(self) -> bytes:
        der = self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hashlib.sha256(b"bench opaque tokens\x00" + der).digest()

    def _opaque_tag(self, random_part: str, secret: bytes) -> str:
        mac = hmac.new(secret, random_part.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:_OPAQUE_TAG_BYTES]).rstrip(b"=").decode()

    def mint_opaque(self) -> str:
        """An opaque access token (no JWS) that ``POST /introspect`` answers as active."""
        random_part = secrets.token_urlsafe(_OPAQUE_RANDOM_BYTES)
        return random_part + self._opaque_tag(random_part, self._opaque_secret)

    def opaque_checker(self) -> Any:
        """``is_ours(token)``: whether this issuer minted ``token`` with ``mint_opaque``."""
        secret = self._opaque_secret
        split = len(secrets.token_urlsafe(_OPAQUE_RANDOM_BYTES))

        def is_ours(token: str) -> bool:
            random_part, tag = token[:split], token[split:]
            if not random_part.isascii() or not tag:
                return False
            return hmac.compare_digest(tag, self._opaque_tag(random_part, secret))

        return is_ours

    def introspection(self, subject: str = "opaque-user") -> dict[str, Any]:
        """The answer for an active opaque token, at this moment."""
        now = int(time.time())
        return {
            "active": True,
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": subject,
            "scope": SCOPE,
            "client_id": CLIENT_ID,
            "exp": now + INTROSPECTION_LIFETIME_S,
            "iat": now,
        }

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/jwks.json",
            "token_endpoint": f"{self.url}/token",
            "introspection_endpoint": f"{self.url}/introspect",
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

    def mint(
        self,
        subject: str = "bench-user",
        lifetime_s: int = _TEN_YEARS_S,
        *,
        cnf: dict[str, str] | None = None,
    ) -> str:
        """An RS256 access token; a negative ``lifetime_s`` mints one that has expired;
        ``cnf`` (``{"jkt": thumbprint}``) binds it to a DPoP key (RFC 9449 §6.1)."""
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
        if cnf is not None:
            claims["cnf"] = cnf
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})


def main() -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser(
        description="serve an issuer's discovery, JWKS, /token, /introspect"
    )
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
    stats: dict[str, Any] = {
        "grants": {"refresh_token": 0},
        "rejected": 0,
        "introspections": {"active": 0, "inactive": 0, "unauthenticated": 0},
    }
    is_ours = issuer.opaque_checker()
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

    def basic_client(header: str) -> tuple[str, str] | None:
        """(client_id, secret) of ``Authorization: Basic`` (RFC 6749 §2.3.1), else None."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            pair = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, colon, secret = pair.partition(":")
        return (unquote(client_id), unquote(secret)) if colon else None

    async def post_introspect(request: web.Request) -> web.Response:
        client = basic_client(request.headers.get("Authorization", ""))
        if client is None or not (
            hmac.compare_digest(client[0], INTROSPECTION_CLIENT_ID)
            & hmac.compare_digest(client[1], INTROSPECTION_CLIENT_SECRET)
        ):
            stats["introspections"]["unauthenticated"] += 1
            return web.json_response(
                {"error": "invalid_client"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="introspection"'},
            )
        form = await request.post()
        token = form.get("token")
        if isinstance(token, str) and token and is_ours(token):
            stats["introspections"]["active"] += 1
            body = issuer.introspection()
        else:
            stats["introspections"]["inactive"] += 1
            body = {"active": False}
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response({**stats, "token_ms": list(durations_ms)})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", get_discovery)
    app.router.add_get("/jwks.json", get_jwks)
    app.router.add_post("/token", post_token)
    app.router.add_post("/introspect", post_introspect)
    app.router.add_get("/__stats", get_stats)
    serve_on_loopback(app, args.port)


if __name__ == "__main__":
    main()
