"""Our JWS parsing and claim checks give pyjwt's verdict on every token, valid or not.

``gateway.tokens.jws`` replaces ``jwt.decode`` on the hot path (pyjwt still verifies the
signature). Each token below goes through ``TokenValidator.verify_jwt`` and through
``jwt.decode`` with the same key, algorithms, issuer, audience, leeway and required
claims; the two must accept the same tokens with the same claims and refuse the rest for
the same reason, except where pyjwt's verdict is wrong (``PYJWT_IS_WRONG``).
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from gateway.errors import InvalidTokenError
from gateway.metrics import Metrics
from gateway.settings import OidcSettings
from gateway.tokens import jws
from gateway.tokens.jwks import SigningKey as JwksKey
from gateway.tokens.validator import TokenValidator
from tests.fakes.issuer import AUDIENCE, FakeIssuer
from tests.unit.tokens.signed import IssuerKeys, b64, segment, sign

ISSUER = "https://idp.example"
LEEWAY_S = 30
REQUIRE = ("exp", "iat", "iss", "aud")
ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")

# pyjwt's exceptions by the result our validator reports; the first match wins.
PYJWT_RESULTS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidIssuedAtError, "bad_iat"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.InvalidTokenError, "malformed"),  # DecodeError, sub/jti types, kid, crit
)
# Tokens pyjwt judges wrongly, with our verdict. pyjwt reads a NumericDate with int(), so
# "1999999999", true and 10**400 are dates to it; RFC 7519 §2 makes one a JSON number that
# a float can hold. It does not check the types of client_id, scope and scp, nor the
# header's typ (RFC 8725 §3.11), which no access token may give as another kind's.
PYJWT_IS_WRONG = {
    "exp-string-number": "malformed",
    "exp-bool": "malformed",  # pyjwt: 1, so "expired"
    "exp-beyond-float": "malformed",
    "iat-string-number": "bad_iat",
    "iat-bool": "bad_iat",
    "nbf-string-number": "malformed",
    "client_id-number": "malformed",
    "scope-list": "malformed",
    "scp-with-number": "malformed",
    "typ-logout": "wrong_type",
    "typ-number": "malformed",
}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "jti": "j-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


class Case:
    def __init__(self, issuer: FakeIssuer) -> None:
        self.issuer = issuer
        self.key = issuer.key("RS256")

    def mint(self, alg: str = "RS256", headers: dict[str, Any] | None = None, **kw: Any) -> str:
        key = self.issuer.key(alg)
        return jwt.encode(
            claims(**kw), key.private, algorithm=alg, headers={"kid": key.kid, **(headers or {})}
        )

    def signed(self, header: dict[str, Any], payload_segment: str, alg: str = "RS256") -> str:
        """Sign arbitrary header and payload segments with the real key."""
        return sign(self.issuer.key(alg), header, payload_segment)


def non_canonical(segment_text: str) -> str:
    """The same bytes spelled with non-zero unused bits in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(segment_text[-1])
    assert len(segment_text) % 4 in (2, 3)  # a last character with unused bits
    assert last % 4 == 0
    return segment_text[:-1] + alphabet[last + 1]


def tokens(case: Case) -> dict[str, str]:
    """name -> token; the ``ok-`` ones are valid."""
    now = int(time.time())
    kid = case.key.kid
    valid = case.mint()
    head, body, sig = valid.split(".")
    stranger = case.issuer.add_key("RS256")
    case.issuer.keys.remove(stranger)
    other = jwt.encode(claims(), stranger.private, algorithm="RS256", headers={"kid": kid})
    flipped = sig[:-3] + ("A" if sig[-3] != "A" else "B") + sig[-2:]
    header = {"alg": "RS256", "kid": kid}
    return {
        "ok-rs256": valid,
        "ok-ps256": case.mint("PS256"),
        "ok-es256": case.mint("ES256"),
        "ok-eddsa": case.mint("EdDSA"),
        "ok-aud-list": case.mint(aud=["other", AUDIENCE]),
        "ok-exp-within-leeway": case.mint(exp=now - 10),
        "ok-exp-float": case.mint(exp=now + 300.5),
        "ok-iat-float": case.mint(iat=now + 0.5),
        "ok-nbf-past": case.mint(nbf=now - 5),
        "ok-extra-header": case.mint(headers={"typ": "at+jwt", "cty": "x"}),
        "ok-typ-jwt": case.mint(headers={"typ": "JWT"}),
        "ok-typ-media-type": case.mint(headers={"typ": "Application/AT+JWT"}),
        "ok-client-id-scope-scp": case.mint(client_id="spa", scope="a b", scp=["a", "b"]),
        "exp-string-number": case.mint(exp=str(now + 300)),
        "exp-nan": case.mint(exp=float("nan")),
        "exp-infinity": case.mint(exp=float("inf")),
        "exp-beyond-float": case.signed(header, segment(claims(exp=10**400))),
        "iat-string-number": case.mint(iat=str(now)),
        "iat-bool": case.mint(iat=True),
        "nbf-string-number": case.mint(nbf=str(now - 5)),
        "client_id-number": case.mint(client_id=5),
        "scope-list": case.mint(scope=["a", "b"]),
        "ok-scp-string": case.mint(scp="a b"),  # Microsoft Entra ID's shape
        "scp-with-number": case.mint(scp=["a", 5]),
        "typ-logout": case.mint(headers={"typ": "logout+jwt"}),
        "typ-number": case.signed({**header, "typ": 5}, body),
        "ok-padded-segments": case.signed(header, body + "=" * (-len(body) % 4)),
        "expired": case.mint(exp=now - 100),
        "exp-bool": case.mint(exp=True),
        "exp-text": case.mint(exp="soon"),
        "exp-missing": case.mint(exp=None),
        "nbf-future": case.mint(nbf=now + 100),
        "nbf-text": case.mint(nbf="later"),
        "iat-future": case.mint(iat=now + 100),
        "iat-text": case.mint(iat="now"),
        "iat-missing": case.mint(iat=None),
        "iss-wrong": case.mint(iss="https://evil.example"),
        "iss-missing": case.mint(iss=None),
        "iss-number": case.signed(header, segment(claims(iss=7))),
        "aud-wrong": case.mint(aud="https://other.example"),
        "aud-list-wrong": case.mint(aud=["a", "b"]),
        "aud-missing": case.mint(aud=None),
        "aud-empty": case.mint(aud=""),
        "aud-list-with-number": case.mint(aud=[AUDIENCE, 5]),
        "aud-object": case.mint(aud={"x": AUDIENCE}),
        "sub-number": case.mint(sub=5),
        "jti-number": case.mint(jti=5),
        "signature-flipped": f"{head}.{body}.{flipped}",
        "payload-swapped": f"{head}.{segment(claims(sub='mallory'))}.{sig}",
        "other-key": other,
        "empty-signature": f"{head}.{body}.",
        "alg-none": f"{segment({'alg': 'none', 'kid': kid})}.{body}.",
        "alg-hs256": f"{segment({'alg': 'HS256', 'kid': kid})}.{body}.{sig}",
        "alg-missing": case.signed({"kid": kid}, body),
        "kid-number": case.signed({"alg": "RS256", "kid": 5}, body),
        "crit-unknown": case.signed({**header, "crit": ["exp"], "exp": 1}, body),
        "b64-false": case.signed({**header, "b64": False, "crit": ["b64"]}, ""),
        "payload-list": case.signed(header, segment([1, 2])),
        "payload-not-json": case.signed(header, b64(b"{nope")),
        "payload-empty": case.signed(header, ""),
        "header-list": f"{segment([1])}.{body}.{sig}",
        "header-not-json": f"{b64(b'{')}.{body}.{sig}",
        "two-segments": f"{head}.{body}",
        "four-segments": f"{valid}.{sig}",
        "junk-character": f"{head}.{body[:10]}!{body[11:]}.{sig}",
        "whitespace": f"{head}.{body} .{sig}",
        "bad-padding": f"{head}.{body}===.{sig}",
        "length-mod-4-is-1": f"{head}.{body}.{sig}{'A' * ((1 - len(sig)) % 4)}",
        "non-canonical": f"{head}.{body}.{non_canonical(sig)}",
        "non-ascii": f"{head}.{body}\u00e9.{sig}",
        "empty": "",
    }


def reference(token: str, issuer: FakeIssuer) -> tuple[str | None, dict[str, Any] | None]:
    """pyjwt's verdict: (None, claims) or (result, None)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = next((k for k in issuer.keys if k.kid == kid), issuer.key("RS256"))
        decoded: dict[str, Any] = jwt.decode(
            token,
            key.private.public_key(),
            algorithms=list(ALGORITHMS),
            audience=[AUDIENCE],
            issuer=ISSUER,
            leeway=LEEWAY_S,
            options={"require": list(REQUIRE)},
        )
    except jwt.PyJWTError as exc:
        return next(result for kind, result in PYJWT_RESULTS if isinstance(exc, kind)), None
    return None, decoded


async def ours(token: str, validator: TokenValidator) -> tuple[str | None, dict[str, Any] | None]:
    try:
        return None, await validator.verify_jwt(
            token, audience=(AUDIENCE,), require=REQUIRE, token_types=jws.ACCESS_TOKEN_TYPES
        )
    except InvalidTokenError as exc:
        return exc.result, None


def leeway_validator(issuer: FakeIssuer) -> TokenValidator:
    return TokenValidator(
        OidcSettings(issuer=ISSUER, audience=(AUDIENCE,), leeway_s=LEEWAY_S),
        IssuerKeys(issuer),  # type: ignore[arg-type]
        Metrics(),
    )


async def test_every_token_gets_pyjwts_verdict() -> None:
    issuer = FakeIssuer(url=ISSUER)
    case = Case(issuer)
    corpus = tokens(case)
    validator = leeway_validator(issuer)
    verdicts = {name: await ours(token, validator) for name, token in corpus.items()}
    expected = {
        name: reference(token, issuer)
        for name, token in corpus.items()
        if name not in PYJWT_IS_WRONG
    }
    assert {n: (v, expected[n]) for n, v in verdicts.items() if v != expected.get(n, v)} == {}
    assert {name: verdicts[name] for name in PYJWT_IS_WRONG} == {
        name: (result, None) for name, result in PYJWT_IS_WRONG.items()
    }
    # Each exclusion is still needed: pyjwt's verdict differs from ours on every one.
    agreed = [n for n, ok in PYJWT_IS_WRONG.items() if reference(corpus[n], issuer)[0] == ok]
    assert agreed == []
    accepted = {name for name, (result, _) in verdicts.items() if result is None}
    assert accepted == {name for name in corpus if name.startswith("ok-")}


async def test_a_deeply_nested_payload_is_malformed_not_a_crash() -> None:
    # pyjwt lets this RecursionError escape (a 500 if it were on our path).
    issuer = FakeIssuer(url=ISSUER)
    token = Case(issuer).signed({"alg": "RS256", "kid": "rs256-default"}, b64(b"[" * 100_000))
    validator = TokenValidator(
        OidcSettings(issuer=ISSUER, audience=(AUDIENCE,)),
        IssuerKeys(issuer),  # type: ignore[arg-type]
        Metrics(),
    )
    assert await ours(token, validator) == ("malformed", None)


@pytest.mark.parametrize("token", ["a.b.c", "x" * 10_000, "..", "a..c"])
async def test_garbage_is_malformed_and_never_reaches_the_key_set(token: str) -> None:
    class NoKeys:
        generation = 1

        async def get_key(self, kid: str | None, alg: str) -> JwksKey:
            raise AssertionError("a malformed token must not look up keys")

    validator = TokenValidator(
        OidcSettings(issuer=ISSUER, audience=(AUDIENCE,)),
        NoKeys(),
        Metrics(),  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidTokenError) as raised:
        await validator.verify_jwt(
            token, audience=(AUDIENCE,), require=REQUIRE, token_types=jws.ACCESS_TOKEN_TYPES
        )
    assert raised.value.result == "malformed"


async def test_remembered_headers_change_no_verdict_and_stay_bounded() -> None:
    """Headers are remembered by their segment: a second pass over the corpus, in another
    order, gives every token the verdict of the first; a refused header is never kept."""
    issuer = FakeIssuer(url=ISSUER)
    case = Case(issuer)
    corpus = tokens(case)
    validator = leeway_validator(issuer)
    first = {name: await ours(token, validator) for name, token in corpus.items()}
    assert validator._headers  # the first pass remembered the valid ones
    second = {name: await ours(corpus[name], validator) for name in reversed(list(corpus))}
    assert second == first
    refused = case.signed({"alg": "RS256", "kid": 5}, b64(b"{}")).split(".")[0]
    assert refused not in validator._headers
    for n in range(3 * jws.HEADERS_KEPT):
        jws.parse(case.signed({"alg": "RS256", "kid": f"k{n}"}, b64(b"{}")), validator._headers)
    assert len(validator._headers) <= jws.HEADERS_KEPT
