"""Registered claims have the types RFC 7519 gives them, on every JWT path: NumericDates are
finite JSON numbers (not "1999999999", not true, not NaN), iss/sub/client_id/jti strings,
aud a string or an array of strings, scope a string, scp an array of strings. Anything else
is an ``InvalidTokenError``, and nothing else ever escapes token validation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from gateway.errors import InvalidTokenError
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.settings import OidcSettings
from gateway.tokens import jws
from gateway.tokens.validator import TokenValidator
from tests.fakes.issuer import AUDIENCE, FakeIssuer
from tests.unit.tokens.signed import IssuerKeys, b64, segment, sign

ISSUER = "https://idp.example"
NOW = 1_700_000_000
LEEWAY_S = 30
FAKE = FakeIssuer(url=ISSUER)
KEY = FAKE.key("RS256")
HEADER = {"alg": "RS256", "kid": KEY.kid}
REQUIRED = ("exp", "iat", "iss", "aud")  # the validator's, with an audience configured
RS256 = pyjwt.get_algorithm_by_name("RS256")


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": NOW - 10,
        "exp": NOW + 300,
        "jti": "j-1",
    }
    return {**base, **overrides}


def token(header: Any = None, **overrides: Any) -> str:
    return sign(KEY, HEADER if header is None else header, segment(claims(**overrides)))


def validator(metrics: Metrics | None = None, **oidc: Any) -> TokenValidator:
    settings = OidcSettings(**{"issuer": ISSUER, "audience": (AUDIENCE,), **oidc})
    return TokenValidator(
        settings,
        IssuerKeys(FAKE),  # type: ignore[arg-type]  # the key set's part, without a JWKS server
        metrics or Metrics(),
        clock=lambda: NOW,
    )


async def verdict(check: TokenValidator, jwt: str) -> tuple[str | None, Principal | None]:
    """(None, the principal) or (the refusal's result, None); any other exception escapes."""
    try:
        principal = await check.validate(jwt)
    except InvalidTokenError as exc:
        return exc.result, None
    return None, principal


async def refusal(check: TokenValidator, jwt: str) -> str:
    with pytest.raises(InvalidTokenError) as raised:
        await check.validate(jwt)
    return raised.value.result


async def test_well_typed_claims_of_every_kind_are_accepted() -> None:
    principal = await validator().validate(
        token(
            exp=NOW + 300.5,
            iat=NOW - 0.5,
            nbf=NOW - 5,
            aud=["other", AUDIENCE],
            client_id="spa",
            scope="api.read",
            scp=["api.write"],
        )
    )
    assert principal.subject == "alice"
    assert principal.expires_at == NOW + 300.5
    assert principal.scopes == {"api.read"}


@pytest.mark.parametrize(
    ("claim", "value", "result"),
    [
        ("exp", "1999999999", "malformed"),  # pyjwt's int() reads it as a date
        ("exp", True, "malformed"),
        ("exp", float("nan"), "malformed"),
        ("exp", float("inf"), "malformed"),  # also how Python's json reads 1e400
        ("exp", 10**400, "malformed"),  # a JSON integer no float holds
        ("exp", None, "missing_claim"),
        ("iat", True, "bad_iat"),
        ("iat", "1699999990", "bad_iat"),
        ("iat", float("-inf"), "malformed"),  # -Infinity is no JSON at all
        ("nbf", "1699999990", "malformed"),
        ("nbf", False, "malformed"),
        ("nbf", float("nan"), "malformed"),
    ],
)
async def test_a_numeric_date_that_is_not_a_finite_json_number_is_refused(
    claim: str, value: Any, result: str
) -> None:
    metrics = Metrics()
    assert await refusal(validator(metrics), token(**{claim: value})) == result
    counted = metrics.registry.get_sample_value(
        "tokengate_token_validations_total", {"provider": "oidc", "result": result}
    )
    assert counted == 1


async def test_python_json_specials_in_the_payload_are_refused() -> None:
    # NaN, Infinity and 1e400 are no JSON, but Python's json reads them (as nan and inf).
    for text in ('"exp":NaN', '"exp":Infinity', '"exp":-Infinity', '"exp":1e400'):
        payload = f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","iat":{NOW},{text}}}'
        assert await refusal(validator(), sign(KEY, HEADER, b64(payload.encode()))) == "malformed"


@pytest.mark.parametrize("claim", ["iss", "sub", "client_id", "jti"])
@pytest.mark.parametrize("value", [7, None, True, ["alice"], {"a": "b"}, 1.5])
async def test_a_string_claim_of_another_type_is_refused_even_when_its_value_is_unchecked(
    claim: str, value: Any
) -> None:
    # No issuer configured (keys from jwks_uri): iss is not compared, but still typed.
    check = validator(issuer=None, jwks_uri="https://idp.example/jwks")
    assert await refusal(check, token(**{claim: value})) in ("malformed", "missing_claim")


@pytest.mark.parametrize("value", [[AUDIENCE, 5], [None], 5, {"aud": AUDIENCE}, True])
async def test_an_audience_of_mixed_or_other_types_is_refused(value: Any) -> None:
    assert await refusal(validator(), token(aud=value)) in ("wrong_audience", "missing_claim")
    # Without an audience to compare, aud is still typed.
    assert await refusal(validator(audience=()), token(aud=value)) == "malformed"


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("scope", ["api.read"]),
        ("scope", 5),
        ("scope", None),
        ("scp", ["api.read", 5]),
        ("scp", [["api.read"]]),
        ("scp", {"api.read": True}),
    ],
)
async def test_scope_must_be_a_string_and_scp_an_array_of_strings(claim: str, value: Any) -> None:
    assert await refusal(validator(), token(**{claim: value})) == "malformed"


async def test_an_entra_scp_string_is_split_on_spaces_like_scope() -> None:
    # Microsoft Entra ID's v2 access tokens: "scp": "api.read api.write", no scope claim.
    principal = await validator().validate(token(scp="api.read\u00a0x api.write"))
    assert principal.scopes == {"api.read\u00a0x", "api.write"}


@pytest.mark.parametrize(
    ("types", "require"),
    [
        (jws.ID_TOKEN_TYPES, ("iss", "aud", "exp", "iat", "sub")),
        (jws.LOGOUT_TOKEN_TYPES, ("iss", "aud", "iat", "jti", "events")),
    ],
)
async def test_id_and_logout_tokens_get_the_same_claim_types(
    types: frozenset[str | None], require: tuple[str, ...]
) -> None:
    check = validator()
    events = {"http://schemas.openid.net/event/backchannel-logout": {}}
    good = token(events=events)
    assert await check.verify_jwt(good, audience=(AUDIENCE,), require=require, token_types=types)
    for bad in ({"exp": "1999999999"}, {"iat": True}, {"sub": 5}, {"aud": [AUDIENCE, 1]}):
        with pytest.raises(InvalidTokenError):
            await check.verify_jwt(
                token(events=events, **bad),
                audience=(AUDIENCE,),
                require=require,
                token_types=types,
            )


# Hypothesis: any JSON value, every type Python's json produces (NaN, infinities and
# integers beyond a float included), nested.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def is_numeric_date(value: Any) -> bool:
    if type(value) is int:
        return abs(value) <= sys.float_info.max
    return type(value) is float and math.isfinite(value)


def is_strings(value: Any) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def is_string(value: Any) -> bool:
    return type(value) is str


# The rule, restated independently of gateway.tokens.jws.
WELL_TYPED: dict[str, Callable[[Any], bool]] = {
    "exp": is_numeric_date,
    "iat": is_numeric_date,
    "nbf": is_numeric_date,
    "iss": is_string,
    "sub": is_string,
    "client_id": is_string,
    "jti": is_string,
    "aud": lambda value: is_string(value) or is_strings(value),
    "scope": is_string,
    "scp": lambda value: is_string(value) or is_strings(value),
}
TIMES = st.integers(NOW - 10**7, NOW) | st.floats(NOW - 1e7, NOW)
GOOD_CLAIMS: dict[str, st.SearchStrategy[Any]] = {
    "exp": st.integers(NOW + 60, NOW + 10**7) | st.floats(NOW + 60, NOW + 1e7),
    "iat": TIMES,
    "nbf": TIMES,
    "iss": st.just(ISSUER),
    "sub": st.text(max_size=8),
    "client_id": st.text(max_size=8),
    "jti": st.text(max_size=8),
    "aud": st.sampled_from([AUDIENCE, [AUDIENCE], ["other", AUDIENCE]]),
    "scope": st.text(max_size=8),
    "scp": st.lists(st.text(max_size=8), max_size=3) | st.text(max_size=8),
}
UNREGISTERED = st.text(max_size=6).filter(lambda name: name not in GOOD_CLAIMS)


def strict_json(value: Any) -> bool:
    """No NaN or Infinity anywhere: json.dumps writes them, but they are not JSON."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(strict_json(item) for item in value.values())
    if isinstance(value, list):
        return all(strict_json(item) for item in value)
    return True


def well_typed(claims: dict[str, Any]) -> bool:
    return all(check(claims[name]) for name, check in WELL_TYPED.items() if name in claims)


@st.composite
def claim_sets(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """Claims, and whether every registered one was drawn well typed and valid. A few
    registered claims are drawn from any JSON value or left out; unregistered ones added."""
    claims = draw(st.dictionaries(UNREGISTERED, JSON_VALUES, max_size=2))
    corrupt = draw(st.sets(st.sampled_from(sorted(GOOD_CLAIMS)), max_size=3))
    missing = draw(st.sets(st.sampled_from(sorted(GOOD_CLAIMS)), max_size=3))
    for name, good in GOOD_CLAIMS.items():
        if name in corrupt:
            claims[name] = draw(JSON_VALUES)
        elif name not in missing:
            claims[name] = draw(good)
    return claims, not corrupt and not missing.intersection(REQUIRED)


ACCESS_TYPS = ["JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt", "Application/JWT"]
OTHER_TYPS = ["logout+jwt", "dpop+jwt", "secevent+jwt", "id_token+jwt", "JOSE", "", "at+jwt "]
ABSENT = object()


@st.composite
def jose_headers(draw: st.DrawFn) -> dict[str, Any]:
    """A header whose alg, kid, typ or extra members may each be anything."""
    corrupt = draw(st.sets(st.sampled_from(["alg", "kid", "typ", "members"]), max_size=2))
    header: dict[str, Any] = {}
    for name, good, bad in (
        ("alg", st.just("RS256"), st.sampled_from(["none", "HS256", "ES256"]) | JSON_VALUES),
        ("kid", st.just(KEY.kid), JSON_VALUES),
        ("typ", st.sampled_from([ABSENT, *ACCESS_TYPS]), st.sampled_from(OTHER_TYPS) | JSON_VALUES),
    ):
        value = draw(bad if name in corrupt else good)
        if value is not ABSENT:
            header[name] = value
    if "members" in corrupt:
        names = st.sampled_from(["crit", "b64", "cty", "jku", "x5u", "jwk"]) | st.text(max_size=4)
        header.update(draw(st.dictionaries(names, JSON_VALUES, min_size=1, max_size=2)))
    return header


def header_acceptable(header: dict[str, Any]) -> bool:
    typ = header.get("typ", ABSENT)
    return (
        strict_json(header)
        and header.get("alg") == "RS256"
        and header.get("kid") == KEY.kid
        and (typ is ABSENT or (is_string(typ) and typ.lower() in ACCESS_TYPE_NAMES))
        and "crit" not in header
        and header.get("b64", True) is True
    )


ACCESS_TYPE_NAMES = {"jwt", "at+jwt", "application/jwt", "application/at+jwt"}


@given(st.dictionaries(st.sampled_from(sorted(GOOD_CLAIMS)) | st.text(max_size=4), JSON_VALUES))
def test_check_claims_passes_only_well_typed_claims(claims: dict[str, Any]) -> None:
    try:
        jws.check_claims(claims, now=NOW, leeway_s=LEEWAY_S, issuer=None, audience=(), require=())
    except InvalidTokenError:
        return
    assert well_typed(claims)


@given(claim_sets())
def test_check_claims_accepts_every_well_typed_valid_claim_set(drawn: Any) -> None:
    claims, valid = drawn
    try:
        jws.check_claims(
            claims,
            now=NOW,
            leeway_s=LEEWAY_S,
            issuer=ISSUER,
            audience=(AUDIENCE,),
            require=REQUIRED,
        )
    except InvalidTokenError:
        assert not valid
    else:
        assert well_typed(claims)


@given(header=jose_headers(), drawn=claim_sets())
async def test_a_signed_token_is_accepted_only_when_its_header_and_claims_are_well_typed(
    header: dict[str, Any], drawn: tuple[dict[str, Any], bool]
) -> None:
    claims, valid = drawn
    jwt = sign(KEY, header, segment(claims))
    result, principal = await verdict(validator(), jwt)
    event(f"result: {result or 'accepted'}")  # --hypothesis-show-statistics shows the mix
    if principal is None:
        assert not (valid and header_acceptable(header) and strict_json(claims)), result
        return
    assert header_acceptable(header)
    assert strict_json(claims)
    assert well_typed(claims)
    assert set(REQUIRED) <= claims.keys()
    assert principal.expires_at == float(claims["exp"])
    # The pieces ``validate`` is made of hold the same verdict on their own.
    parsed = jws.parse(jwt, {})
    assert jws.verify_signature(parsed, RS256, KEY.private.public_key()) == claims
    jws.check_claims(
        claims, now=NOW, leeway_s=LEEWAY_S, issuer=ISSUER, audience=(AUDIENCE,), require=REQUIRED
    )


SEGMENT_TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
TOKEN_LIKE = (
    st.text()
    | st.lists(SEGMENT_TEXT, min_size=1, max_size=4).map(".".join)
    | st.lists(st.binary(max_size=64), min_size=3, max_size=3).map(
        lambda parts: ".".join(b64(part) for part in parts)
    )
    | st.tuples(JSON_VALUES, JSON_VALUES, st.binary(max_size=8)).map(
        lambda parts: f"{segment(parts[0])}.{segment(parts[1])}.{b64(parts[2])}"
    )
)


@given(TOKEN_LIKE)
async def test_any_string_as_a_token_is_refused_with_invalid_token_error_only(text: str) -> None:
    with pytest.raises(InvalidTokenError):
        await validator().validate(text)
    try:
        parsed = jws.parse(text, {})
    except InvalidTokenError:
        return
    with pytest.raises(InvalidTokenError):
        jws.verify_signature(parsed, RS256, KEY.private.public_key())
