"""A static token issuer for the benchmark: discovery document, JWKS, and minted tokens.

The driver generates an RSA key (:meth:`Issuer.generate`), writes it as PEM, starts this
module as a process (``python bench/issuer.py --key key.pem --port N``) that serves
``/.well-known/openid-configuration`` and ``/jwks.json`` on 127.0.0.1, and mints tokens
in-process with :meth:`Issuer.mint` (RS256, ``iss``/``aud``/``exp`` far ahead/``scope``).

TODO(session, refresh-storm): a ``/token`` endpoint answering ``refresh_token`` grants
(counting them) goes here when tokengate's session mode exists; see bench/README.md.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

AUDIENCE = "https://api.bench.test"
SCOPE = "api.read api.write"
KID = "bench-1"
_TEN_YEARS_S = 10 * 365 * 86400


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
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=KID, use="sig", alg="RS256")
        return {"keys": [jwk]}

    def mint(self, subject: str = "bench-user", lifetime_s: int = _TEN_YEARS_S) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": subject,
            "scope": SCOPE,
            "iat": now,
            "exp": now + lifetime_s,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})


def main() -> None:
    import uvloop
    from aiohttp import web

    parser = argparse.ArgumentParser(description="serve an issuer's discovery and JWKS")
    parser.add_argument("--key", type=Path, required=True, help="PEM private key")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    issuer = Issuer.load(args.key, f"http://127.0.0.1:{args.port}")
    discovery, jwks = issuer.discovery(), issuer.jwks()

    async def get_discovery(request: web.Request) -> web.Response:
        return web.json_response(discovery)

    async def get_jwks(request: web.Request) -> web.Response:
        return web.json_response(jwks, headers={"Cache-Control": "max-age=3600"})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", get_discovery)
    app.router.add_get("/jwks.json", get_jwks)
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
