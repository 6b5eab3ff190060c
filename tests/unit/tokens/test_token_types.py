"""Explicit typing (RFC 8725 §3.11): each JWT path accepts the kinds of token it expects by
the header's ``typ``, and refuses a token that says it is another kind, even one signed by
our issuer's key. Access tokens: none, JWT or at+jwt (RFC 9068 §2.1), only at+jwt with
``oidc.require_at_jwt``; ID tokens: none or JWT; logout tokens: none, JWT or logout+jwt
(OpenID Connect Back-Channel Logout 1.0 §2.4).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidTokenError
from gateway.metrics import Metrics
from gateway.settings import OidcSettings
from gateway.tokens import jws
from gateway.tokens.jwks import SigningKey as JwksKey
from gateway.tokens.validator import TokenValidator
from tests.fakes.issuer import AUDIENCE, FakeIssuer
from tests.unit.tokens.signed import IssuerKeys, segment, sign

ISSUER = "https://idp.example"
NOW = 1_700_000_000
FAKE = FakeIssuer(url=ISSUER)
KEY = FAKE.key("RS256")
BCL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
CLAIMS = {
    "iss": ISSUER,
    "aud": AUDIENCE,
    "sub": "alice",
    "iat": NOW - 10,
    "exp": NOW + 300,
    "jti": "j-1",
    "events": {BCL_EVENT: {}},
}
ABSENT = None  # a header without typ
OTHER_KINDS = ["logout+jwt", "dpop+jwt", "secevent+jwt", "id_token+jwt", "JOSE", "at+jwt+x"]


def typed(typ: Any = ABSENT) -> str:
    header = {"alg": "RS256", "kid": KEY.kid}
    if typ is not ABSENT:
        header["typ"] = typ
    return sign(KEY, header, segment(CLAIMS))


def validator(metrics: Metrics | None = None, **oidc: Any) -> TokenValidator:
    settings = OidcSettings(issuer=ISSUER, audience=(AUDIENCE,), **oidc)
    return TokenValidator(
        settings,
        IssuerKeys(FAKE),  # type: ignore[arg-type]  # the key set's part, without a JWKS server
        metrics or Metrics(),
        clock=lambda: NOW,
    )


async def access_verdict(check: TokenValidator, token: str) -> str | None:
    try:
        await check.validate(token)
    except InvalidTokenError as exc:
        return exc.result
    return None


async def verdict(check: TokenValidator, token: str, kinds: frozenset[str | None]) -> str | None:
    try:
        await check.verify_jwt(token, audience=(AUDIENCE,), require=("iss",), token_types=kinds)
    except InvalidTokenError as exc:
        return exc.result
    return None


@pytest.mark.parametrize(
    "typ", [ABSENT, "JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt", "application/JWT"]
)
async def test_an_untyped_jwt_or_at_jwt_access_token_is_accepted(typ: str | None) -> None:
    assert await access_verdict(validator(), typed(typ)) is None


@pytest.mark.parametrize("typ", [*OTHER_KINDS, "application/logout+jwt", ""])
async def test_an_access_token_typed_as_another_kind_is_refused(typ: str) -> None:
    metrics = Metrics()
    assert await access_verdict(validator(metrics), typed(typ)) == "wrong_type"
    refused = metrics.registry.get_sample_value(
        "tokengate_token_validations_total", {"provider": "oidc", "result": "wrong_type"}
    )
    assert refused == 1


@pytest.mark.parametrize("typ", [5, None, True, ["at+jwt"], {"typ": "at+jwt"}])
async def test_a_typ_that_is_not_a_string_is_malformed(typ: Any) -> None:
    header = {"alg": "RS256", "kid": KEY.kid, "typ": typ}
    token = sign(KEY, header, segment(CLAIMS))
    assert await access_verdict(validator(), token) == "malformed"


async def test_require_at_jwt_accepts_at_jwt_access_tokens_only() -> None:
    strict = validator(require_at_jwt=True)
    for typ in ("at+jwt", "AT+JWT", "application/at+jwt"):
        assert await access_verdict(strict, typed(typ)) is None, typ
    for typ in (ABSENT, "JWT", "application/jwt", "logout+jwt"):
        assert await access_verdict(strict, typed(typ)) == "wrong_type", typ


async def test_id_tokens_are_untyped_or_jwt() -> None:
    check = validator()
    for typ in (ABSENT, "JWT", "jwt"):
        assert await verdict(check, typed(typ), jws.ID_TOKEN_TYPES) is None, typ
    for typ in ("at+jwt", "logout+jwt", "dpop+jwt", "id_token+jwt"):
        assert await verdict(check, typed(typ), jws.ID_TOKEN_TYPES) == "wrong_type", typ


async def test_logout_tokens_are_untyped_jwt_or_logout_jwt() -> None:
    check = validator()
    for typ in (ABSENT, "JWT", "logout+jwt", "application/logout+jwt"):
        assert await verdict(check, typed(typ), jws.LOGOUT_TOKEN_TYPES) is None, typ
    for typ in ("at+jwt", "dpop+jwt", "secevent+jwt"):
        assert await verdict(check, typed(typ), jws.LOGOUT_TOKEN_TYPES) == "wrong_type", typ


async def test_one_header_gets_each_kinds_verdict_though_headers_are_remembered() -> None:
    """The header memo is shared by every path: a typ accepted for one kind is not
    remembered as accepted for another, in either order."""
    check = validator()
    logout = typed("logout+jwt")
    assert await verdict(check, logout, jws.LOGOUT_TOKEN_TYPES) is None
    assert await access_verdict(check, logout) == "wrong_type"
    assert await verdict(check, logout, jws.LOGOUT_TOKEN_TYPES) is None
    access = typed("at+jwt")
    assert await access_verdict(check, access) is None
    assert await verdict(check, access, jws.ID_TOKEN_TYPES) == "wrong_type"
    assert await access_verdict(check, access) is None


async def test_a_token_of_the_wrong_kind_never_reaches_the_key_set() -> None:
    # Refused before the key lookup: a token of the wrong kind cannot make us refetch keys.
    class NoKeys:
        generation = 1

        async def get_key(self, kid: str | None, alg: str) -> JwksKey:
            raise AssertionError("a token of the wrong kind must not look up keys")

    check = TokenValidator(
        OidcSettings(issuer=ISSUER, audience=(AUDIENCE,)),
        NoKeys(),  # type: ignore[arg-type]  # the key set's part
        Metrics(),
        clock=lambda: NOW,
    )
    assert await access_verdict(check, typed("dpop+jwt")) == "wrong_type"
