"""Compact JWS parsing (RFC 7515 §7.1) and the registered JWT claims (RFC 7519 §4.1).

pyjwt does the cryptography (its algorithm objects verify the signature); this module does
the rest of what ``jwt.decode`` does, with the same verdicts, at a third of the cost: from
2.15 pyjwt checks every base64url character of a token in a Python generator
(GHSA-hxm8-2xgr-2p9m), 24 µs of a 52 µs decode for a 650-byte access token, where one
compiled pattern does the same check in about 1 µs. ``tests/unit/tokens/test_jws.py``
holds the two to the same answer over valid, forged and malformed tokens.

Where pyjwt converts a claim to what it wants (``int("1999999999")``) this module refuses
it: claims have the types RFC 7519 gives them, and a token carries the ``typ`` of the kind
its reader expects (RFC 8725 §3.11).

Every failure is an ``InvalidTokenError`` whose ``result`` is the metric label and whose
text may be shown to the client (RFC 6750 §3). Which key and algorithm apply, and which
kinds of token a path accepts, is the caller's business (``validator``).
"""

from __future__ import annotations

import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt.algorithms import Algorithm, RSAAlgorithm

from gateway.errors import InvalidTokenError

# A segment: base64url, optionally padded with '=' to a multiple of 4 (as pyjwt accepts:
# some issuers pad). Three segments, nothing else: no whitespace, no JSON serialization.
_SEGMENT = r"[A-Za-z0-9_-]*={0,2}"
_COMPACT = re.compile(rf"({_SEGMENT})\.({_SEGMENT})\.({_SEGMENT})")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# Claims a token is not valid before, and the result when one is not a number (pyjwt's).
_NOT_BEFORE_CLAIMS = (("iat", "bad_iat"), ("nbf", "malformed"))
# String claims: iss and sub (StringOrURI, RFC 7519 §4.1.1-2), jti (§4.1.7), client_id
# (RFC 9068 §2.2).
_STRING_CLAIMS = ("iss", "sub", "client_id", "jti")
# Kinds of token by their JOSE "typ" (RFC 8725 §3.11), as ``check_token_type`` spells it:
# lower case, without "application/" (RFC 7515 §4.1.9); None is a token without a typ.
ACCESS_TOKEN_TYPES: frozenset[str | None] = frozenset({None, "jwt", "at+jwt"})
AT_JWT_TYPES: frozenset[str | None] = frozenset({"at+jwt"})  # RFC 9068 §2.1, when required
ID_TOKEN_TYPES: frozenset[str | None] = frozenset({None, "jwt"})
LOGOUT_TOKEN_TYPES: frozenset[str | None] = frozenset({None, "jwt", "logout+jwt"})  # BCL 1.0 §2.4
# An issuer signs every token with the same few headers ({"alg", "kid", "typ"}): the caller
# keeps the checked header of each header segment seen, reused read-only. Bounded: the
# memo is cleared when it holds this many.
HEADERS_KEPT = 64
_PKCS1V15 = padding.PKCS1v15()


@dataclass(frozen=True, slots=True)
class CompactJws:
    header: Mapping[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


def invalid(result: str, description: str) -> InvalidTokenError:
    return InvalidTokenError(description, result=result)


def _malformed(what: str = "the token is malformed") -> InvalidTokenError:
    return invalid("malformed", what)


def _decode_segment(segment: str) -> bytes:
    raw = segment.encode("ascii")  # the pattern admitted ASCII only
    stripped = raw.rstrip(b"=")
    if stripped != raw and len(raw) % 4:
        raise _malformed()
    standard = stripped.translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(stripped) % 4)
    try:
        decoded = binascii.a2b_base64(standard, strict_mode=True)
    except binascii.Error:
        raise _malformed() from None
    # Canonical only: unused trailing bits must be zero, so one token has one spelling.
    if binascii.b2a_base64(decoded, newline=False) != standard:
        raise _malformed()
    return decoded


def _no_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are Python's json extensions, not JSON (RFC 8259 §6).
    raise ValueError(name)


# ``json.loads`` with any option builds a decoder per call (a third of a small payload's
# decode); this one is built once.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def strict_json(data: bytes) -> Any:
    """``data`` as ``json.loads(data)`` reads it (the encoding detected the same way), but
    without NaN and the infinities; ``ValueError`` (``RecursionError`` when too deep)."""
    return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = strict_json(data)
    except (ValueError, RecursionError):
        raise _malformed(f"the token's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise _malformed(f"the token's {what} is not a JSON object")
    return value


def parse(token: str, known_headers: dict[str, Mapping[str, Any]]) -> CompactJws:
    """The three parts of a compact JWS; the header decoded, nothing verified yet.
    ``known_headers`` is the caller's memo of checked headers by segment (see HEADERS_KEPT)."""
    match = _COMPACT.fullmatch(token)
    if match is None:
        raise _malformed()
    head, body, signature = match.groups()
    header = known_headers.get(head)
    if header is None:
        header = _parse_header(head)
        if len(known_headers) >= HEADERS_KEPT:
            known_headers.clear()
        known_headers[head] = header
    return CompactJws(
        header=header,
        payload=_decode_segment(body),
        signing_input=f"{head}.{body}".encode("ascii"),
        signature=_decode_segment(signature),
    )


def _parse_header(head: str) -> Mapping[str, Any]:
    header = _json_object(_decode_segment(head), "header")
    if "kid" in header and not isinstance(header["kid"], str):
        raise _malformed()
    if "typ" in header and not isinstance(header["typ"], str):
        raise _malformed("the token's typ header is not a string")
    # We implement no JWS extension; a critical one we do not know must be refused (RFC 7515
    # §4.1.11). That includes b64=false (RFC 7797), an unencoded payload.
    if "crit" in header or header.get("b64", True) is not True:
        raise _malformed("the token uses an unsupported JWS extension")
    return header


def check_token_type(header: Mapping[str, Any], allowed: frozenset[str | None]) -> None:
    """Refuse a token whose ``typ`` names a kind the caller does not expect (one of the
    ``*_TYPES`` above): a logout or DPoP proof token is no access token, even when signed
    by the same issuer. Checked per call, not remembered with the header: the header memo
    is shared by every kind."""
    typ = header.get("typ")  # a string or absent: ``parse`` refused anything else
    if typ is not None:
        typ = typ.lower().removeprefix("application/")
    if typ not in allowed:
        raise invalid("wrong_type", "the token is not of the kind expected here (typ)")


def verify_signature(jws: CompactJws, algorithm: Algorithm, key: Any) -> dict[str, Any]:
    """The claims, once the signature checks out with ``key`` under ``algorithm``."""
    check_signature(jws, algorithm, key)
    return unverified_claims(jws)


def unverified_claims(jws: CompactJws) -> dict[str, Any]:
    """The payload as a JSON object, signature not checked: to read ``iss`` and pick the
    keys, or the claims once ``check_signature`` passed."""
    return _json_object(jws.payload, "payload")


def check_signature(jws: CompactJws, algorithm: Algorithm, key: Any) -> None:
    """Refuse the token unless its signature checks out with ``key`` under ``algorithm``."""
    if type(algorithm) is RSAAlgorithm and isinstance(key, rsa.RSAPublicKey):
        # RS256/384/512, the common case, straight to cryptography as pyjwt would call it,
        # without building a padding and a hash object per token.
        try:
            key.verify(jws.signature, jws.signing_input, _PKCS1V15, algorithm.hash_alg())
        except InvalidSignature:
            raise invalid("bad_signature", "the token's signature is invalid") from None
        return
    try:
        prepared = algorithm.prepare_key(key)
    except jwt.InvalidKeyError:
        raise invalid("bad_algorithm", "the token's algorithm does not fit its key") from None
    if not algorithm.verify(jws.signing_input, prepared, jws.signature):
        raise invalid("bad_signature", "the token's signature is invalid")


def check_claims(
    claims: dict[str, Any],
    *,
    now: float,
    leeway_s: float,
    issuer: str | None,
    audience: tuple[str, ...],
    require: tuple[str, ...],
) -> None:
    """RFC 7519 §4.1 checks, in pyjwt's order and with its results where it refuses:
    required claims, iat, nbf, exp, iss, aud (any of ``audience``; none checked when
    empty); then the type of every other registered claim we read."""
    for name in require:
        if claims.get(name) is None:
            raise invalid("missing_claim", "the token lacks a required claim")
    for name, unreadable in _NOT_BEFORE_CLAIMS:
        if name in claims:
            value = parse_numeric_date(claims[name])
            if value is None:
                raise invalid(unreadable, f"the token's {name} claim is invalid")
            if value > now + leeway_s:
                raise invalid("not_yet_valid", "the token is not yet valid")
    if "exp" in claims:
        exp = parse_numeric_date(claims["exp"])
        if exp is None:
            raise _malformed("the token's exp claim is invalid")
        if exp <= now - leeway_s:
            raise invalid("expired", "the token has expired")
    if issuer is not None:
        if "iss" not in claims:
            raise invalid("missing_claim", "the token lacks a required claim")
        if claims["iss"] != issuer:
            raise invalid("wrong_issuer", "the token has the wrong issuer")
    if audience:
        _check_audience(claims.get("aud"), audience)
    _check_claim_types(claims)


def parse_numeric_date(value: Any) -> float | None:
    """A NumericDate (RFC 7519 §2: a JSON number), or None for anything else.

    SECURITY: not pyjwt's ``int(value)``, which reads "1999999999" and true as dates. A
    string, a boolean, NaN and the infinities (Python's json reads NaN, Infinity, and 1e400
    as inf) are refused, and so is an integer beyond a float's range.
    """
    kind = type(value)  # exact types: a bool is an int to isinstance
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return None
    if kind is float:
        return value if math.isfinite(value) else None
    return None


def _check_claim_types(claims: dict[str, Any]) -> None:
    # SECURITY: a claim of another type is refused, never converted: what a mistyped claim
    # means to the next reader (the upstream, a log) is anyone's guess. Present means typed:
    # null is no string either.
    for name in _STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise _malformed(f"the token's {name} claim is not a string")
    if "aud" in claims and not isinstance(claims["aud"], str) and not _strings(claims["aud"]):
        raise _malformed("the token's aud claim is not a string or an array of strings")
    if "scope" in claims and not isinstance(claims["scope"], str):
        raise _malformed("the token's scope claim is not a string")  # RFC 8693 §4.2
    # scp is an array of strings (Okta, Keycloak) or, in Microsoft Entra ID's access tokens,
    # a space-delimited string like scope; nothing else.
    if "scp" in claims and not isinstance(claims["scp"], str) and not _strings(claims["scp"]):
        raise _malformed("the token's scp claim is not a string or an array of strings")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_audience(claim: Any, audience: tuple[str, ...]) -> None:
    if not claim:
        raise invalid("missing_claim", "the token lacks a required claim")
    values = [claim] if isinstance(claim, str) else claim
    if not _strings(values):
        raise invalid("wrong_audience", "the token has the wrong audience")
    if all(aud not in values for aud in audience):
        raise invalid("wrong_audience", "the token has the wrong audience")
