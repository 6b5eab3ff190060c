"""DPoP proofs (RFC 9449 §4.2) as the bench's client signs them, for ``tg-dpop``.

One ES256 key per run (:class:`ProofSigner`); the bench issuer binds a token to it with
``cnf.jkt``, its RFC 7638 thumbprint (``gateway.tokens.dpop.jwk_thumbprint``, the one
tokengate compares with). A proof is good for one request: a fresh ``jti`` each, the
exact method and URL (``htu``: tokengate's ``public_url`` and the path, no query), ``iat``
the second it was signed (tokengate takes it for 60 s plus 5 s of leeway) and ``ath`` the
access token's hash. :meth:`ProofSigner.write_proofs` signs a file of them for wrk
(``lua/pick_header.lua``, one per line, each sent once).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.tokens.dpop import jwk_thumbprint


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


class ProofSigner:
    """A client's ES256 key: its public JWK, thumbprint, and proofs signed with it."""

    ALG = "ES256"

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self._algorithm = jwt.get_algorithm_by_name(self.ALG)
        jwk = self._algorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwk = {name: jwk[name] for name in ("kty", "crv", "x", "y")}
        self.thumbprint = jwk_thumbprint(self.jwk)  # the token's cnf.jkt
        # The same header for every proof (tokengate keeps the key it built from it).
        self._header = _segment({"typ": "dpop+jwt", "alg": self.ALG, "jwk": self.jwk})

    def proof(self, *, method: str, url: str, access_token: str, iat: int | None = None) -> str:
        """One proof for ``method`` ``url`` (no query) with ``access_token``."""
        claims = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": int(time.time()) if iat is None else iat,
            "ath": _b64(hashlib.sha256(access_token.encode("ascii")).digest()),
        }
        signing_input = f"{self._header}.{_segment(claims)}"
        signature = self._algorithm.sign(signing_input.encode("ascii"), self.key)
        return f"{signing_input}.{_b64(signature)}"

    def write_proofs(
        self, path: Path, count: int, *, method: str, url: str, access_token: str
    ) -> float:
        """``count`` distinct proofs, one per line, all with this second's ``iat``; the
        seconds it took to sign them."""
        started = time.perf_counter()
        iat = int(time.time())
        with path.open("w") as out:
            for _ in range(count):
                proof = self.proof(method=method, url=url, access_token=access_token, iat=iat)
                out.write(proof + "\n")
        return time.perf_counter() - started
