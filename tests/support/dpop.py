"""DPoP proofs (RFC 9449 §4.2) as a client builds them, for unit and integration tests.

``DpopKey`` is a client's key pair with its public JWK and RFC 7638 thumbprint (computed
here, not by ``gateway.tokens.dpop``); ``make_proof`` signs any header and claims with it,
well-formed or not: ``OMIT`` leaves a member out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

OMIT: Any = object()  # as a value in extra_header / extra_claims: leave the member out

_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _private_key(alg: str, curve: str | None) -> Any:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg.startswith("ES"):
        return ec.generate_private_key(
            {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        )
    if alg == "EdDSA":
        if curve == "Ed448":
            return ed448.Ed448PrivateKey.generate()
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


@dataclass(frozen=True)
class DpopKey:
    alg: str
    private: Any
    jwk: dict[str, Any]  # public
    thumbprint: str

    @classmethod
    def generate(cls, alg: str = "ES256", curve: str | None = None) -> DpopKey:
        private = _private_key(alg, curve)
        jwk = jwt.get_algorithm_by_name(alg).to_jwk(private.public_key(), as_dict=True)
        jwk.pop("key_ops", None)
        canonical = json.dumps(
            {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]},
            sort_keys=True,
            separators=(",", ":"),
        )
        thumbprint = b64(hashlib.sha256(canonical.encode()).digest())
        return cls(alg=alg, private=private, jwk=jwk, thumbprint=thumbprint)

    def private_jwk(self) -> dict[str, Any]:
        """The key with its private members, as a careless client might send it."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        return algorithm.to_jwk(self.private, as_dict=True)


@functools.cache
def dpop_key(alg: str = "ES256", curve: str | None = None) -> DpopKey:
    """One key per algorithm, shared by every test (RSA keys cost ~50 ms each)."""
    return DpopKey.generate(alg, curve)


def ath(access_token: str) -> str:
    return b64(hashlib.sha256(access_token.encode("ascii")).digest())


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    merged = {**base, **(extra or {})}
    return {name: value for name, value in merged.items() if value is not OMIT}


def make_proof(
    key: DpopKey,
    jwk: Any = None,
    *,
    method: str,
    url: str,
    access_token: str | None,
    iat: Any = None,
    jti: Any = None,
    nonce: Any = None,
    typ: Any = "dpop+jwt",
    alg: Any = None,
    extra_header: dict[str, Any] | None = None,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """A proof signed by ``key`` (with its own algorithm, whatever ``alg`` the header
    names). ``jwk`` None is ``key``'s public JWK; ``iat`` None is now, ``jti`` None a fresh
    one, ``nonce`` None none, ``access_token`` None no ``ath``."""
    header = _merge(
        {"typ": typ, "alg": alg or key.alg, "jwk": key.jwk if jwk is None else jwk},
        extra_header,
    )
    claims = _merge(
        {
            "jti": uuid.uuid4().hex if jti is None else jti,
            "htm": method,
            "htu": url,
            "iat": int(time.time()) if iat is None else iat,
        },
        extra_claims,
    )
    if access_token is not None and "ath" not in claims and "ath" not in (extra_claims or {}):
        claims["ath"] = ath(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    return sign(key, header, claims)


def sign(key: DpopKey, header: Any, claims: Any) -> str:
    """Any header and payload (JSON values) as a compact JWS signed by ``key``."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    signature = jwt.get_algorithm_by_name(key.alg).sign(f"{head}.{body}".encode(), key.private)
    return f"{head}.{body}.{b64(signature)}"
