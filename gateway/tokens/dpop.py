"""DPoP proofs at a resource server (RFC 9449 §4.3, §7.1), with server nonces (§8, §9).

``DpopVerifier.verify`` checks one proof against the request it came with (method, URL,
access token) and answers the thumbprint (RFC 7638) of the key that signed it: the proof
is a compact JWS (``jws.parse``) of type ``dpop+jwt``, signed with an allowed asymmetric
algorithm by the public key in its ``jwk`` header; its claims name the request (``htm``,
``htu``), its time (``iat``), the access token (``ath``) and, when ``dpop.nonce`` is on,
one of our nonces. A proof is taken once: its key and ``jti`` are remembered in the
``TokenState`` (memory or Redis, shared by every replica) for as long as its ``iat`` is
acceptable, and that is the last check, so a proof refused for any other reason never
uses up its ``jti``. The nonce is checked just before: ``use_dpop_nonce`` says that the
proof was right but for the nonce, so the client's retry with it passes.

Nonces are stateless: ``base64url(slot || HMAC-SHA256(nonce_secret, slot)[:16])`` for the
time slot ``floor(now / nonce_lifetime_s)``; the current and the previous slot's are
taken, so every replica with the same secret issues and accepts the same nonces without
sharing anything.

Every failure is an ``InvalidDpopProofError`` (or ``UseDpopNonceError``) whose ``result``
is the metric label and whose description may be shown to the client: it never repeats
the proof, the token or anything the client sent. The challenge (``dpop_algs``, and the
nonce to use) is set here. Whether the access token is bound to this key (``cnf.jkt``),
and whether a route takes DPoP at all, is the caller's business (``auth``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import Algorithm

from gateway.errors import (
    InvalidDpopProofError,
    InvalidTokenError,
    SessionStoreUnavailableError,
    UseDpopNonceError,
)
from gateway.metrics import Metrics
from gateway.settings import DpopSettings
from gateway.tokens import jws
from gateway.tokens.shared import SharedStateUnavailable, TokenState

PROOF_TYPES: frozenset[str | None] = frozenset({"dpop+jwt"})  # RFC 9449 §4.2
MAX_JTI_LENGTH = 256
REPLAY_NAMESPACE = "dpop"
# SECURITY: the key type (and curve) each algorithm takes (RFC 7518 §3.1, RFC 8037 §3.1):
# an ES256 proof signed by a P-384 key, or an RSA key under EdDSA, is refused before any
# key is built. Curves in tuples: a JSON array as crv is compared there, never hashed.
_KEYS_FOR_ALG: Mapping[str, tuple[str, tuple[str | None, ...]]] = {
    **{alg: ("RSA", (None,)) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", ("P-256",)),
    "ES384": ("EC", ("P-384",)),
    "ES512": ("EC", ("P-521",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}
# RFC 7638 §3.2 (RSA, EC) and RFC 8037 §2 (OKP): the members a thumbprint hashes.
_THUMBPRINT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}
# SECURITY: members of a private or symmetric key (RFC 7518 §6.2.2, §6.3.2, §6.4.1; RFC
# 8037 §2). A proof's key is public; one that says otherwise is refused, never used.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# RSA moduli we verify with: RFC 7518 §3.3's minimum, and a maximum so that a client's
# key cannot make each verification arbitrarily slow.
_RSA_BITS = (2048, 8192)
# Keys built from proof headers, by header segment: a client signs every proof with the
# same header. Cleared when it holds this many (as ``jws.HEADERS_KEPT``).
_KEYS_KEPT = 256

_NONCE_LABEL = b"tokengate dpop nonce v1\x00"
_NONCE_MAC_BYTES = 16
_NONCE_SLOT_BYTES = 8

# RFC 3986 Appendix B, for an absolute URI with an authority; §2.2-2.3 for the characters.
_ABSOLUTE_URL = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?[^#]*)?(?:#.*)?", re.S
)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_HOST_CHARS = _UNRESERVED | _SUB_DELIMS
_PATH_CHARS = _UNRESERVED | _SUB_DELIMS | frozenset(":@/")
_PERCENT_OR_CHAR = re.compile(r"%[0-9A-Fa-f]{2}|[^%]|%", re.S)
_IP_LITERAL = re.compile(r"\[[0-9A-Za-z:.]+\]")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 thumbprint (SHA-256, base64url without padding) of a public JWK.

    ``ValueError`` for a key type other than RSA, EC and OKP, or when a required member is
    missing or not a string. Other members (``kid``, ``alg``, ...) do not count.
    """
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError("unsupported key type")
    required = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"the key's {name} member is missing or not a string")
        required[name] = value
    # §3: members in lexicographic order, no white space, nothing escaped that need not be.
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url(SHA-256(the token's ASCII octets)), no padding.
    ``ValueError`` (``UnicodeEncodeError``) for a token that is not ASCII."""
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


def normalize_htu(url: str) -> str | None:
    """An http(s) URL as RFC 9449 §4.3 item 9 compares it: syntax- and scheme-based
    normalisation (RFC 3986 §6.2.2, §6.2.3) without the query and the fragment. None when
    ``url`` is not an absolute http or https URL with a host (or has user information,
    which RFC 9110 §4.2.4 makes an error).

    Scheme and host in lower case, the default port dropped (and a port's leading zeros),
    percent-encodings in upper case and those of unreserved characters decoded, dot
    segments removed, an empty path as "/". Characters outside ASCII in the path are
    percent-encoded as UTF-8 (RFC 3987 §3.1); ASCII that RFC 3986 does not allow there
    (white space, controls, ``"<>\\^`{|}``) makes the URL no URL.
    """
    match = _ABSOLUTE_URL.fullmatch(url)
    if match is None:
        return None
    scheme, authority, path = match.group(1).lower(), match.group(2), match.group(3)
    default_port = _DEFAULT_PORTS.get(scheme)
    if default_port is None or "@" in authority:
        return None
    host_port = _split_authority(authority)
    if host_port is None:
        return None
    host, port = host_port
    normal_host = _normalize_host(host)
    normal_path = _normalize_percent(path, _PATH_CHARS)
    if not normal_host or normal_path is None:
        return None
    port_part = "" if port in ("", default_port) else f":{port}"
    return f"{scheme}://{normal_host}{port_part}{_remove_dot_segments(normal_path) or '/'}"


def _split_authority(authority: str) -> tuple[str, str] | None:
    """(host, port) with the port as digits without leading zeros, or "" when absent."""
    if authority.startswith("["):
        end = authority.find("]") + 1
        host, rest = authority[:end], authority[end:]
        if not end or _IP_LITERAL.fullmatch(host) is None:
            return None
    else:
        host, colon, port = authority.partition(":")
        rest = colon + port
    if not rest:
        return host, ""
    digits = rest[1:]
    if rest[0] != ":" or not digits.isascii() or (digits and not digits.isdigit()):
        return None
    digits = digits.lstrip("0") or ("0" if digits else "")
    if len(digits) > 5 or (digits and int(digits) > 65535):
        return None
    return host, digits


def _normalize_host(host: str) -> str | None:
    if host.startswith("["):
        return host.lower()  # an IP literal, checked by _split_authority
    return _normalize_percent(host, _HOST_CHARS, host=True)


def _normalize_percent(text: str, allowed: frozenset[str], *, host: bool = False) -> str | None:
    """Percent-encodings in upper case, unreserved ones decoded; a host in lower case (but
    for the hex digits of what stays encoded), a path's non-ASCII encoded."""
    out: list[str] = []
    for token in _PERCENT_OR_CHAR.findall(text):
        if len(token) == 3:
            char = chr(int(token[1:], 16))
            if char in _UNRESERVED:
                out.append(char.lower() if host else char)
            else:
                out.append(token.upper())
        elif token in allowed:
            out.append(token.lower() if host else token)
        elif not host and not token.isascii():
            try:
                encoded = token.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no character at all
                return None
            out.append("".join(f"%{byte:02X}" for byte in encoded))
        else:
            return None  # a "%" without two hex digits, or a character URIs do not have
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path (or an empty one), by segments."""
    if not path:
        return ""
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class _ProofKey:
    algorithm: Algorithm
    key: Any  # a cryptography public key object
    thumbprint: str


def _is_base64url(value: Any) -> bool:
    return isinstance(value, str) and _BASE64URL.fullmatch(value) is not None


def _invalid(result: str, description: str) -> InvalidDpopProofError:
    return InvalidDpopProofError(description, result=result)


_URLS_KEPT = 4096  # normalised URLs remembered (request and proof URLs)


class DpopVerifier:
    """Checks DPoP proofs for one gateway; ``state`` is shared by every replica that must
    refuse each other's replays."""

    def __init__(
        self,
        settings: DpopSettings,
        state: TokenState,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._state = state
        self._metrics = metrics
        self._clock = clock
        unknown = set(settings.algorithms) - _KEYS_FOR_ALG.keys()
        if unknown:  # settings take asymmetric algorithms only; all of them are here
            raise ValueError(f"no DPoP key type for {sorted(unknown)}")
        self._algorithms: dict[str, Algorithm] = {
            alg: jwt.get_algorithm_by_name(alg) for alg in settings.algorithms
        }
        self._headers: dict[str, Mapping[str, Any]] = {}  # checked JOSE headers, see jws
        self._keys: dict[str, _ProofKey] = {}  # by header segment, see _KEYS_KEPT
        self._urls: dict[str, str | None] = {}  # normalised, see _normalized
        # A proof is taken until its iat leaves the window: iat may be leeway_s ahead now
        # and is taken until max_age_s + leeway_s after it.
        self._replay_ttl_s = settings.max_age_s + 2 * settings.leeway_s
        secret = settings.nonce_secret
        self._nonce_key = None if secret is None else secret.get_secret_value().encode()
        self._nonces: dict[int, str] = {}  # by slot, the last few

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms a proof may use, for the challenge's ``algs`` (RFC 9449 §7.1)."""
        return self._settings.algorithms

    def current_nonce(self) -> str | None:
        """The nonce to send in ``DPoP-Nonce`` when nonces are required, else None."""
        if not self._settings.nonce:
            return None
        return self._nonce(self._slot(self._clock()))

    async def verify(self, proof: str, *, method: str, url: str, access_token: str) -> str:
        """The thumbprint (``jkt``) of the key that signed ``proof`` for this request and
        ``access_token``, or ``InvalidDpopProofError`` / ``UseDpopNonceError`` saying why
        not; ``SessionStoreUnavailableError`` when replays cannot be checked."""
        try:
            key, jti = self._check(proof, method=method, url=url, access_token=access_token)
        except InvalidTokenError as exc:  # only ever ours: _check translates jws's
            raise self.refused(exc) from None
        # SECURITY: last, so that only a proof that passed every other check is remembered.
        # Keyed by key and jti: another client's jti is no replay of ours.
        replay_key = hashlib.sha256(f"{key.thumbprint}:{jti}".encode("utf-8", "surrogatepass"))
        try:
            fresh = await self._state.remember_once(
                REPLAY_NAMESPACE, replay_key.hexdigest(), ttl_s=self._replay_ttl_s
            )
        except SharedStateUnavailable:
            self._count("unavailable")
            # SECURITY: fail closed; a proof we cannot remember could be replayed.
            raise SessionStoreUnavailableError("the DPoP replay cache is unavailable") from None
        if not fresh:
            raise self.refused(_invalid("replayed", "the DPoP proof has been used before"))
        self._count("valid")
        return key.thumbprint

    def _count(self, result: str) -> None:
        self._metrics.add(self._metrics.dpop_proofs_total, result)

    def refused(self, exc: InvalidTokenError) -> InvalidTokenError:
        """``exc`` counted by its result, with DPoP's challenge: for the refusals ``auth``
        makes around a proof (a bound token as Bearer, an unbound one as DPoP, ...)."""
        self._count(exc.result)
        exc.dpop_algs = self.algorithms
        exc.dpop_nonce = self.current_nonce()
        return exc

    def _check(
        self, proof: str, *, method: str, url: str, access_token: str
    ) -> tuple[_ProofKey, str]:
        """Every check but the replay: the proof's key and its jti."""
        try:
            parsed = jws.parse(proof, self._headers)
        except InvalidTokenError:
            raise _invalid("malformed", "the DPoP proof is not a well-formed JWS") from None
        head = proof.partition(".")[0]
        key = self._keys.get(head)
        if key is None:
            key = self._proof_key(parsed.header)
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            self._keys[head] = key
        try:
            claims = jws.verify_signature(parsed, key.algorithm, key.key)
        except InvalidTokenError as exc:
            if exc.result == "malformed":
                raise _invalid("malformed", "the DPoP proof's claims are no JSON object") from None
            if exc.result == "bad_signature":
                raise _invalid("bad_signature", "the DPoP proof's signature is invalid") from None
            # The key does not fit the algorithm after all (_proof_key checked it).
            raise _invalid("bad_key", "the DPoP proof's jwk does not fit its algorithm") from None
        jti = self._check_claims(claims, method=method, url=url, access_token=access_token)
        return key, jti

    def _proof_key(self, header: Mapping[str, Any]) -> _ProofKey:
        """typ, alg and the jwk header: the key to verify with, and its thumbprint."""
        try:
            # SECURITY: RFC 8725 §3.11; an access or ID token is no proof.
            jws.check_token_type(header, PROOF_TYPES)
        except InvalidTokenError:
            raise _invalid("wrong_type", "the DPoP proof's typ is not dpop+jwt") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            # SECURITY: the allowlist holds asymmetric algorithms only (settings): never
            # none, never HS* (the "key" would be in the proof itself).
            raise _invalid("bad_algorithm", "the DPoP proof's algorithm is not allowed")
        algorithm = self._algorithms[alg]
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise _invalid("bad_key", "the DPoP proof has no jwk header")
        if not _PRIVATE_MEMBERS.isdisjoint(jwk):
            # SECURITY: RFC 9449 §4.3 item 7.
            raise _invalid("bad_key", "the DPoP proof's jwk is not a public key")
        kty, curves = _KEYS_FOR_ALG[alg]
        crv = jwk.get("crv") if kty != "RSA" else None
        if jwk.get("kty") != kty or crv not in curves:
            raise _invalid("bad_key", "the DPoP proof's jwk does not fit its algorithm")
        if "alg" in jwk and jwk["alg"] != alg:
            raise _invalid("bad_key", "the DPoP proof's jwk is for another algorithm")
        # SECURITY: pyjwt's base64url decoding skips characters outside the alphabet, so one
        # key would have many spellings and as many thumbprints; one spelling only.
        if not all(
            _is_base64url(jwk.get(name))
            for name in _THUMBPRINT_MEMBERS[kty]
            if name not in ("kty", "crv")
        ):
            raise _invalid("bad_key", "the DPoP proof's jwk is malformed")
        try:
            public_key = jwt.PyJWK.from_dict(jwk, algorithm=alg).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, UnsupportedAlgorithm, ValueError, TypeError):
            raise _invalid("bad_key", "the DPoP proof's jwk is not a usable key") from None
        if isinstance(public_key, rsa.RSAPublicKey) and not (
            _RSA_BITS[0] <= public_key.key_size <= _RSA_BITS[1]
        ):
            raise _invalid("bad_key", "the DPoP proof's RSA key has an unsupported size")
        return _ProofKey(algorithm=algorithm, key=public_key, thumbprint=jwk_thumbprint(jwk))

    def _normalized(self, url: str) -> str | None:
        """``normalize_htu``, remembered: a client sends the same few URLs, and one
        normalisation costs about 12 µs. Bounded (cleared when full): keys are client text."""
        memo = self._urls
        if url in memo:
            return memo[url]
        if len(memo) >= _URLS_KEPT:
            memo.clear()
        normal = memo[url] = normalize_htu(url)
        return normal

    def _check_claims(
        self, claims: dict[str, Any], *, method: str, url: str, access_token: str
    ) -> str:
        """RFC 9449 §4.3 items 8-12 (the nonce last): the proof's jti."""
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
            raise _invalid("bad_jti", "the DPoP proof's jti is missing or invalid")
        # RFC 9110 §9.1: methods are case-sensitive.
        if claims.get("htm") != method:
            raise _invalid("wrong_method", "the DPoP proof is for another HTTP method")
        htu = claims.get("htu")
        expected_url = self._normalized(url)
        if (
            not isinstance(htu, str)
            or expected_url is None  # SECURITY: None must never equal None
            or self._normalized(htu) != expected_url
        ):
            raise _invalid("wrong_url", "the DPoP proof is for another URL")
        self._check_iat(claims.get("iat"))
        ath = claims.get("ath")
        if not (
            isinstance(ath, str)
            and ath.isascii()  # compare_digest takes ASCII strings only
            and access_token.isascii()
            and hmac.compare_digest(ath, access_token_hash(access_token))
        ):
            raise _invalid("bad_ath", "the DPoP proof is for another access token (ath)")
        if self._settings.nonce:
            self._check_nonce(claims.get("nonce"))
        return jti

    def _check_iat(self, value: Any) -> None:
        iat = jws.parse_numeric_date(value)  # SECURITY: a JSON number, never "1700000000"
        if iat is None:
            raise _invalid("bad_iat", "the DPoP proof's iat is missing or not a number")
        now = self._clock()
        settings = self._settings
        if iat < now - settings.max_age_s - settings.leeway_s:
            raise _invalid("stale", "the DPoP proof is too old (iat)")
        if iat > now + settings.leeway_s:
            raise _invalid("future", "the DPoP proof's iat is in the future")

    def _check_nonce(self, value: Any) -> None:
        slot = self._slot(self._clock())
        if isinstance(value, str) and value.isascii():
            for accepted in (self._nonce(slot), self._nonce(slot - 1)):
                if hmac.compare_digest(value, accepted):
                    return
        raise UseDpopNonceError(
            "the DPoP proof must carry the current nonce from DPoP-Nonce", result="nonce"
        )

    def _slot(self, now: float) -> int:
        return math.floor(now / self._settings.nonce_lifetime_s)

    def _nonce(self, slot: int) -> str:
        nonce = self._nonces.get(slot)
        if nonce is None:
            if self._nonce_key is None:  # settings refuse nonce without nonce_secret
                raise RuntimeError("DPoP nonces need dpop.nonce_secret")
            slot_bytes = slot.to_bytes(_NONCE_SLOT_BYTES, "big", signed=True)
            mac = hmac.new(self._nonce_key, _NONCE_LABEL + slot_bytes, hashlib.sha256)
            nonce = _b64url(slot_bytes + mac.digest()[:_NONCE_MAC_BYTES])
            if len(self._nonces) >= 4:
                self._nonces.clear()
            self._nonces[slot] = nonce
        return nonce
