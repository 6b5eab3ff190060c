"""Tokens of any shape, signed by the fake issuer's real keys, and the key set that knows
them: what the token tests feed ``TokenValidator`` without a JWKS server."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt

from gateway.errors import InvalidTokenError
from gateway.tokens.jwks import SigningKey as JwksKey
from tests.fakes.issuer import FakeIssuer, SigningKey, public_jwk


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    """A JSON value as a segment; NaN and the infinities as Python's json writes them."""
    return b64(json.dumps(value).encode())


def sign(key: SigningKey, header: Any, payload_segment: str) -> str:
    """Any header (a JSON value) over any payload segment, with a valid signature."""
    head = segment(header)
    algorithm = jwt.get_algorithm_by_name(key.alg)
    signature = algorithm.sign(f"{head}.{payload_segment}".encode(), key.private)
    return f"{head}.{payload_segment}.{b64(signature)}"


class IssuerKeys:
    """The JWKS cache's part, for one issuer: the key by kid, or unknown."""

    generation = 1

    def __init__(self, issuer: FakeIssuer) -> None:
        self._keys = {
            k.kid: JwksKey.parse(public_jwk(k.private, k.kid, k.alg)) for k in issuer.keys
        }

    async def get_key(self, kid: str | None, alg: str) -> JwksKey:
        key = self._keys.get(kid or "")
        if key is None or alg not in key.algorithms:
            raise InvalidTokenError("the token's signing key is unknown")
        return key
