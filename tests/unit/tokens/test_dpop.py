"""DPoP proofs at the resource server (``gateway.tokens.dpop``): every check of RFC 9449
§4.3 refuses what it must (one test each, failing when the check is missing), replays
are refused in one process and across replicas sharing the state, nonces work across
replicas, and generated proofs and URLs never get a wrong answer or a foreign exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.errors import (
    InvalidDpopProofError,
    InvalidTokenError,
    SessionStoreUnavailableError,
    UseDpopNonceError,
)
from gateway.metrics import Metrics
from gateway.settings import DpopSettings
from gateway.tokens.dpop import (
    DpopVerifier,
    access_token_hash,
    jwk_thumbprint,
    normalize_htu,
)
from gateway.tokens.shared import MemoryTokenState, SharedStateUnavailable
from tests.support.dpop import OMIT, DpopKey, b64, dpop_key, make_proof, sign

NOW = 1_750_000_000.0
URL = "https://api.example.test/orders/17?page=2"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
SECRET = "n" * 40
ALGS = ("ES256", "EdDSA", "RS256", "PS256")
MAX_AGE_S = 60.0
LEEWAY_S = 5.0


class RecordingState(MemoryTokenState):
    """Memory state that counts what it was asked to remember."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: 0.0)
        self.calls: list[tuple[str, str, float]] = []

    async def remember_once(self, namespace: str, key: str, ttl_s: float) -> bool:
        self.calls.append((namespace, key, ttl_s))
        return await super().remember_once(namespace, key, ttl_s)


class DownState(MemoryTokenState):
    async def remember_once(self, namespace: str, key: str, ttl_s: float) -> bool:
        raise SharedStateUnavailable("ConnectionError")


def settings(**overrides: Any) -> DpopSettings:
    values: dict[str, Any] = {"algorithms": ALGS, "max_age_s": MAX_AGE_S, "leeway_s": LEEWAY_S}
    values.update(overrides)
    return DpopSettings(**values)


def verifier(
    *,
    state: MemoryTokenState | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = lambda: NOW,
    **overrides: Any,
) -> DpopVerifier:
    return DpopVerifier(
        settings(**overrides), state or RecordingState(), metrics or Metrics(), clock=clock
    )


def proof(key: DpopKey | None = None, **overrides: Any) -> str:
    values: dict[str, Any] = {"method": "GET", "url": URL, "access_token": TOKEN, "iat": NOW}
    values.update(overrides)
    return make_proof(key or dpop_key("ES256"), **values)


async def check(dpop: DpopVerifier, value: str, **request: Any) -> str:
    values: dict[str, Any] = {"method": "GET", "url": URL, "access_token": TOKEN}
    values.update(request)
    return await dpop.verify(value, **values)


async def refused(dpop: DpopVerifier, value: str, result: str, **request: Any) -> InvalidTokenError:
    with pytest.raises(InvalidDpopProofError) as caught:
        await check(dpop, value, **request)
    assert caught.value.result == result
    assert caught.value.dpop_algs == ALGS  # the challenge names what we take
    return caught.value


def counted(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("tokengate_dpop_proofs_total", {"result": result})
    return value or 0.0


# --- the helpers -----------------------------------------------------------------------


def test_rfc7638_example_thumbprint() -> None:
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS"
            "oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65"
            "YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyr"
            "dkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzK"
            "nqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", [*ALGS, "ES384", "ES512"])
def test_thumbprint_takes_only_the_required_members(alg: str) -> None:
    key = dpop_key(alg)
    assert jwk_thumbprint(key.jwk) == key.thumbprint
    decorated = {**key.jwk, "kid": "k1", "use": "sig", "alg": alg}
    assert jwk_thumbprint(dict(reversed(decorated.items()))) == key.thumbprint


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "RSA", "n": "AQAB"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": 7},
        {"kty": "OKP", "crv": None, "x": "AA"},
        {"kty": ["RSA"], "n": "AQAB", "e": "AQAB"},
        {},
    ],
)
def test_thumbprint_refuses_keys_it_cannot_take(jwk: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="key"):
        jwk_thumbprint(jwk)


def test_access_token_hash_is_rfc9449s_example() -> None:
    # RFC 9449 §7.1.
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert access_token_hash(token) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("https://server.example.com/token", "https://server.example.com/token"),
        ("HTTPS://Server.Example.COM:443/token?x=1#f", "https://server.example.com/token"),
        ("http://h:80", "http://h/"),
        ("http://h:", "http://h/"),
        ("http://h:0080/a", "http://h/a"),
        ("https://h:8443/a", "https://h:8443/a"),
        ("https://h:80/a", "https://h:80/a"),
        ("https://h/%7euser/%7E/~", "https://h/~user/~/~"),
        ("https://h/a%2fb%3A", "https://h/a%2Fb%3A"),
        ("https://h/a/./b/../c/%2E%2e/d", "https://h/a/d"),
        ("https://h/a/b/..", "https://h/a/"),
        ("https://h/../../a", "https://h/a"),
        ("https://h/caf\u00e9", "https://h/caf%C3%A9"),
        ("https://%41%62c.example/", "https://abc.example/"),
        ("https://[::1]:443/x", "https://[::1]/x"),
        ("https://[FE80::1]/x", "https://[fe80::1]/x"),
        ("https://h?only-a-query", "https://h/"),
        ("https://h:" + "0" * 5000 + "1/x", "https://h:1/x"),  # no int() of 5000 digits
    ],
)
def test_normalize_htu(url: str, normal: str) -> None:
    assert normalize_htu(url) == normal


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/relative/path",
        "//h/no-scheme",
        "ftp://h/x",
        "https:///no-host",
        "https://user:pw@h/x",
        "https://h:99999/x",
        "https://h:8x/x",
        "https://h:1:2/x",
        "https://h/a b",
        "https://h/a%zz",
        "https://h/a%4",
        "https://h/a\\b",
        "https://h/a\nb",
        "https://h\u00e9/x",
        "https://[::1/x",
        "https://[v1.x@y]/x",
        " https://h/x",
        "https://h/\ud800",
    ],
)
def test_normalize_htu_refuses_what_is_no_http_url(url: str) -> None:
    assert normalize_htu(url) is None


# --- valid proofs --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
async def test_a_valid_proof_of_each_algorithm_gives_its_keys_thumbprint(alg: str) -> None:
    metrics = Metrics()
    state = RecordingState()
    dpop = verifier(metrics=metrics, state=state)
    key = dpop_key(alg)
    assert await check(dpop, proof(key)) == key.thumbprint
    assert counted(metrics, "valid") == 1
    # Remembered by a digest of key and jti, for as long as the iat is acceptable.
    [(namespace, replay_key, ttl_s)] = state.calls
    assert namespace == "dpop"
    assert len(replay_key) == 64
    assert ttl_s == MAX_AGE_S + 2 * LEEWAY_S


async def test_an_ed448_key_is_taken_under_eddsa() -> None:
    key = dpop_key("EdDSA", "Ed448")
    assert await check(verifier(), proof(key)) == key.thumbprint


async def test_the_proof_matches_an_equivalent_spelling_of_the_url() -> None:
    value = proof(url="HTTPS://API.example.test:443/orders/./17#top")
    assert await check(verifier(), value, url=URL)


@pytest.mark.parametrize("typ", ["DPoP+JWT", "application/dpop+jwt"])
async def test_typ_is_a_media_type_compared_without_case(typ: str) -> None:
    assert await check(verifier(), proof(typ=typ))


@pytest.mark.parametrize("age_s", [-LEEWAY_S, 0.0, MAX_AGE_S + LEEWAY_S])
async def test_iat_is_taken_at_the_edges_of_the_window(age_s: float) -> None:
    assert await check(verifier(), proof(iat=NOW - age_s))


async def test_a_fractional_iat_is_a_number() -> None:
    assert await check(verifier(), proof(iat=NOW - 0.5))


# --- one check each ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-jws",
        "a.b",
        "a.b.c.d",
        f"{b64(b'[]')}.{b64(b'{}')}.AA",
        f"{b64(b'{')}.{b64(b'{}')}.AA",
        proof() + " ",
    ],
)
async def test_what_is_no_compact_jws_is_malformed(value: str) -> None:
    await refused(verifier(), value, "malformed")


async def test_a_payload_that_is_no_json_object_is_malformed() -> None:
    key = dpop_key("ES256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.jwk}
    await refused(verifier(), sign(key, header, ["not", "an", "object"]), "malformed")


async def test_a_critical_extension_is_malformed() -> None:
    await refused(verifier(), proof(extra_header={"crit": ["exp"], "exp": 1}), "malformed")


@pytest.mark.parametrize(
    ("overrides"),
    [
        {"typ": None},  # jws: typ is a string when present
        {"extra_claims": {"iat": float("nan")}},  # NaN is no JSON (RFC 8259 §6)
        {"extra_claims": {"htm": float("inf")}},
    ],
)
async def test_what_jws_refuses_is_malformed(overrides: dict[str, Any]) -> None:
    await refused(verifier(), proof(**overrides), "malformed")


@pytest.mark.parametrize("typ", [OMIT, "jwt", "at+jwt", "dpop", "dpop+jwt ", "dpop+jwt+x"])
async def test_a_proof_must_say_it_is_one(typ: Any) -> None:
    await refused(verifier(), proof(typ=typ), "wrong_type")


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS512", "es256", None, 256])
async def test_an_algorithm_outside_the_allowlist_is_refused(alg: Any) -> None:
    await refused(verifier(), proof(extra_header={"alg": alg}), "bad_algorithm")


async def test_the_allowlist_is_the_settings() -> None:
    dpop = verifier(algorithms=("ES256",))
    exc = await refused_any(dpop, proof(dpop_key("RS256")))
    assert exc.result == "bad_algorithm"
    assert exc.dpop_algs == dpop.algorithms == ("ES256",)


async def refused_any(dpop: DpopVerifier, value: str) -> InvalidTokenError:
    with pytest.raises(InvalidDpopProofError) as caught:
        await check(dpop, value)
    return caught.value


@pytest.mark.parametrize("jwk", [OMIT, None, "a key", ["a", "key"], 7])
async def test_the_jwk_header_must_be_a_json_object(jwk: Any) -> None:
    await refused(verifier(), proof(extra_header={"jwk": jwk}), "bad_key")


@pytest.mark.parametrize("alg", ALGS)
async def test_a_private_key_in_the_jwk_is_refused(alg: str) -> None:
    key = dpop_key(alg)
    await refused(verifier(), proof(key, jwk=key.private_jwk()), "bad_key")


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
async def test_every_private_member_is_refused(member: str) -> None:
    key = dpop_key("ES256")
    await refused(verifier(), proof(key, jwk={**key.jwk, member: "AAAA"}), "bad_key")


@pytest.mark.parametrize(
    ("alg", "signer"),
    [
        ("ES256", ("RS256", None)),
        ("ES256", ("ES384", None)),  # an EC key of another curve
        ("ES256", ("EdDSA", None)),
        ("EdDSA", ("ES256", None)),
        ("RS256", ("ES256", None)),
        ("PS256", ("EdDSA", None)),
    ],
)
async def test_the_key_type_must_fit_the_algorithm(alg: str, signer: tuple[str, None]) -> None:
    other = dpop_key(*signer)
    # The header names alg with the other key's jwk: refused before any signature.
    await refused(verifier(), proof(other, alg=alg), "bad_key")


@pytest.mark.parametrize(
    "change",
    [
        {"kty": "oct"},
        {"kty": OMIT},
        {"crv": "P-384"},
        {"crv": OMIT},
        {"crv": ["P-256"]},
        {"crv": {"P-256": 1}},
        {"x": OMIT},
        {"x": 12},
        {"x": "AAAA"},  # no point of the curve
        {"alg": "ES384"},
    ],
)
async def test_a_jwk_that_is_no_usable_key_is_refused(change: dict[str, Any]) -> None:
    key = dpop_key("ES256")
    jwk = {k: v for k, v in {**key.jwk, **change}.items() if v is not OMIT}
    await refused(verifier(), proof(key, jwk=jwk), "bad_key")


@pytest.mark.parametrize("spell", [lambda x: x + "=", lambda x: x[:9] + "!" + x[9:]])
async def test_a_key_spelt_outside_base64url_is_refused(spell: Callable[[str], str]) -> None:
    # pyjwt would read the same key (it skips what is no base64url), under another
    # thumbprint: one key, one spelling.
    key = dpop_key("ES256")
    await refused(verifier(), proof(key, jwk={**key.jwk, "x": spell(key.jwk["x"])}), "bad_key")


async def test_an_rsa_key_below_2048_bits_is_refused() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    jwk = jwt.get_algorithm_by_name("RS256").to_jwk(private.public_key(), as_dict=True)
    key = DpopKey(alg="RS256", private=private, jwk=jwk, thumbprint="")
    await refused(verifier(), proof(key), "bad_key")


async def test_a_proof_signed_by_another_key_is_refused() -> None:
    signer, named = DpopKey.generate("ES256"), dpop_key("ES256")
    await refused(verifier(), proof(signer, jwk=named.jwk), "bad_signature")


async def test_a_changed_payload_breaks_the_signature() -> None:
    head, _, signature = proof().split(".")
    _, body, _ = proof(method="POST").split(".")
    await refused(verifier(), f"{head}.{body}.{signature}", "bad_signature", method="POST")


@pytest.mark.parametrize("jti", [OMIT, "", 17, None, ["a"], "j" * 257])
async def test_jti_must_be_a_bounded_non_empty_string(jti: Any) -> None:
    await refused(verifier(), proof(extra_claims={"jti": jti}), "bad_jti")


@pytest.mark.parametrize("htm", [OMIT, "POST", "get", "GET ", None, ["GET"]])
async def test_htm_must_be_the_requests_method(htm: Any) -> None:
    await refused(verifier(), proof(extra_claims={"htm": htm}), "wrong_method")


@pytest.mark.parametrize(
    "htu",
    [
        OMIT,
        None,
        ["https://api.example.test/orders/17"],
        "https://api.example.test/orders/18",
        "https://api.example.test/orders/17/",
        "https://api.example.test/Orders/17",
        "http://api.example.test/orders/17",
        "https://api.example.test:8443/orders/17",
        "https://other.example.test/orders/17",
        "https://api.example.test/orders%2F17",
        "/orders/17",
        "not a url",
    ],
)
async def test_htu_must_be_the_requests_url(htu: Any) -> None:
    await refused(verifier(), proof(extra_claims={"htu": htu}), "wrong_url")


async def test_a_request_url_that_does_not_normalise_matches_nothing() -> None:
    # None == None must not pass: neither side is a URL.
    await refused(verifier(), proof(url="not a url"), "wrong_url", url="not a url")


@pytest.mark.parametrize("iat", [OMIT, None, str(int(NOW)), True, [NOW], 10**400])
async def test_iat_must_be_a_number(iat: Any) -> None:
    await refused(verifier(), proof(extra_claims={"iat": iat}), "bad_iat")


async def test_an_old_proof_is_stale() -> None:
    await refused(verifier(), proof(iat=NOW - MAX_AGE_S - LEEWAY_S - 1), "stale")


async def test_a_proof_from_the_future_is_refused() -> None:
    await refused(verifier(), proof(iat=NOW + LEEWAY_S + 1), "future")


@pytest.mark.parametrize(
    "ath", [OMIT, None, 7, access_token_hash("another token"), "\u00e9" * 43, ""]
)
async def test_ath_must_be_the_access_tokens_hash(ath: Any) -> None:
    await refused(verifier(), proof(extra_claims={"ath": ath}), "bad_ath")


async def test_a_proof_for_one_token_is_no_proof_for_another() -> None:
    await refused(verifier(), proof(), "bad_ath", access_token=TOKEN + "x")
    await refused(verifier(), proof(), "bad_ath", access_token="t\u00f6ken")


MARKER = "ZQXJMARKER"


@pytest.mark.parametrize(
    "overrides",
    [
        {"typ": MARKER},
        {"extra_header": {"alg": MARKER}},
        {"extra_header": {"jwk": {"kty": MARKER}}},
        {"extra_claims": {"jti": MARKER * 40}},
        {"extra_claims": {"htm": MARKER}},
        {"extra_claims": {"htu": f"https://{MARKER}/"}},
        {"extra_claims": {"iat": MARKER}},
        {"extra_claims": {"ath": MARKER}},
    ],
)
async def test_no_error_repeats_what_the_client_sent(overrides: dict[str, Any]) -> None:
    value = proof(**overrides)
    exc = await refused_any(verifier(nonce=True, nonce_secret=SECRET), value)
    shown = exc.description + repr(exc.headers()) + repr(exc.body())
    for secret in (MARKER, value, TOKEN):
        assert secret not in shown


async def test_every_refusal_is_counted_by_its_result() -> None:
    metrics = Metrics()
    dpop = verifier(metrics=metrics)
    await refused(dpop, "garbage", "malformed")
    await refused(dpop, proof(typ="jwt"), "wrong_type")
    await refused(dpop, proof(iat=NOW - 3600), "stale")
    await refused(dpop, proof(iat=NOW - 3600), "stale")
    assert await check(dpop, proof())
    assert [counted(metrics, r) for r in ("malformed", "wrong_type", "stale", "valid")] == [
        1,
        1,
        2,
        1,
    ]


# --- replays -------------------------------------------------------------------------


async def test_a_replay_is_refused() -> None:
    metrics = Metrics()
    dpop = verifier(metrics=metrics)
    value = proof()
    assert await check(dpop, value)
    await refused(dpop, value, "replayed")
    assert counted(metrics, "replayed") == 1


async def test_a_replay_to_another_replica_sharing_the_state_is_refused() -> None:
    state = MemoryTokenState()
    first, second = verifier(state=state), verifier(state=state)
    value = proof()
    assert await check(first, value)
    await refused(second, value, "replayed")


async def test_the_same_jti_from_another_key_is_no_replay() -> None:
    dpop = verifier()
    assert await check(dpop, proof(dpop_key("ES256"), jti="same"))
    assert await check(dpop, proof(dpop_key("EdDSA"), jti="same"))


async def test_a_refused_proof_does_not_use_up_its_jti() -> None:
    state = RecordingState()
    dpop = verifier(state=state)
    value = proof()
    await refused(dpop, value, "wrong_method", method="POST")
    await refused(dpop, value, "wrong_url", url="https://api.example.test/other")
    await refused(dpop, value, "bad_ath", access_token="other")
    assert state.calls == []
    assert await check(dpop, value)  # the proof for this request is still good


async def test_no_replay_cache_fails_closed() -> None:
    metrics = Metrics()
    dpop = verifier(state=DownState(), metrics=metrics)
    with pytest.raises(SessionStoreUnavailableError):
        await check(dpop, proof())
    assert counted(metrics, "unavailable") == 1
    assert counted(metrics, "valid") == 0


# --- nonces --------------------------------------------------------------------------


def nonce_verifier(
    clock: Callable[[], float], state: MemoryTokenState | None = None
) -> DpopVerifier:
    return verifier(clock=clock, state=state, nonce=True, nonce_secret=SECRET, nonce_lifetime_s=300)


async def test_without_nonces_there_is_no_nonce() -> None:
    dpop = verifier()
    assert dpop.current_nonce() is None
    exc = await refused(dpop, proof(iat=0), "stale")
    assert exc.dpop_nonce is None
    assert "DPoP-Nonce" not in exc.headers()


async def test_the_nonce_flow() -> None:
    now = [NOW]
    dpop = nonce_verifier(lambda: now[0])
    with pytest.raises(UseDpopNonceError) as caught:
        await check(dpop, proof())
    nonce = caught.value.dpop_nonce
    assert nonce is not None
    assert nonce == dpop.current_nonce()
    assert caught.value.result == "nonce"
    assert caught.value.dpop_algs == ALGS
    assert caught.value.headers()["DPoP-Nonce"] == nonce
    assert caught.value.headers()["WWW-Authenticate"].startswith('DPoP error="use_dpop_nonce"')
    assert await check(dpop, proof(nonce=nonce))
    # Still taken in the next slot; not two slots on.
    now[0] += 300
    assert dpop.current_nonce() != nonce
    assert await check(dpop, proof(nonce=nonce, iat=now[0]))
    now[0] += 300
    with pytest.raises(UseDpopNonceError) as caught:
        await check(dpop, proof(nonce=nonce, iat=now[0]))
    assert caught.value.dpop_nonce == dpop.current_nonce() != nonce


async def test_another_replica_with_the_same_secret_takes_the_nonce() -> None:
    first, second = nonce_verifier(lambda: NOW), nonce_verifier(lambda: NOW + 1)
    nonce = first.current_nonce()
    assert nonce == second.current_nonce()
    assert await check(second, proof(nonce=nonce))


async def test_another_secret_makes_other_nonces() -> None:
    ours = nonce_verifier(lambda: NOW)
    theirs = verifier(nonce=True, nonce_secret="m" * 40)
    with pytest.raises(UseDpopNonceError):
        await check(ours, proof(nonce=theirs.current_nonce()))


@pytest.mark.parametrize("nonce", [7, "", "x" * 32, "\u00e9", ["a"]])
async def test_anything_but_our_nonce_asks_for_it(nonce: Any) -> None:
    with pytest.raises(UseDpopNonceError):
        await check(nonce_verifier(lambda: NOW), proof(extra_claims={"nonce": nonce}))


async def test_a_proof_without_the_nonce_does_not_use_up_its_jti() -> None:
    state = RecordingState()
    dpop = nonce_verifier(lambda: NOW, state)
    with pytest.raises(UseDpopNonceError):
        await check(dpop, proof(jti="retry"))
    assert state.calls == []
    assert await check(dpop, proof(jti="retry", nonce=dpop.current_nonce()))


async def test_every_refusal_carries_the_nonce_when_nonces_are_on() -> None:
    dpop = nonce_verifier(lambda: NOW)
    exc = await refused(dpop, proof(typ="jwt"), "wrong_type")
    assert exc.dpop_nonce == dpop.current_nonce()
    assert exc.headers()["DPoP-Nonce"] == dpop.current_nonce()


# --- generated proofs ----------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["dpop+jwt", "ES256", "GET", URL, "", str(int(NOW))]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=8,
)


@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_=-]{0,60}(\.[A-Za-z0-9_=-]{0,60}){2}"))
async def test_garbage_is_refused_as_malformed_proofs(value: str) -> None:
    state = RecordingState()
    with pytest.raises(InvalidDpopProofError):
        await check(verifier(state=state), value)
    assert state.calls == []


VALID_PROOF = proof(jti="the-one")


@given(index=st.integers(0, len(VALID_PROOF) - 1), char=st.characters())
async def test_a_proof_changed_anywhere_is_refused(index: int, char: str) -> None:
    assume(VALID_PROOF[index] != char)
    changed = VALID_PROOF[:index] + char + VALID_PROOF[index + 1 :]
    state = RecordingState()
    with pytest.raises(InvalidDpopProofError):
        await check(verifier(state=state), changed)
    assert state.calls == []


def _valid_member(name: str, value: Any, nonce: str) -> bool:
    """Whether a generated member's value is one the proof may carry."""
    key = dpop_key("ES256")
    checks: dict[str, Callable[[Any], bool]] = {
        "typ": lambda v: (
            isinstance(v, str) and v.lower().removeprefix("application/") == "dpop+jwt"
        ),
        "alg": lambda v: v == "ES256" and type(v) is str,
        "jwk": lambda v: v == key.jwk,
        "jti": lambda v: isinstance(v, str) and 0 < len(v) <= 256,
        "htm": lambda v: v == "GET" and type(v) is str,
        "htu": lambda v: isinstance(v, str) and normalize_htu(v) == normalize_htu(URL),
        "iat": lambda v: type(v) in (int, float) and NOW - 65 <= v <= NOW + 5,
        "ath": lambda v: v == access_token_hash(TOKEN) and type(v) is str,
        "nonce": lambda v: v == nonce and type(v) is str,
    }
    return checks[name](value)


@given(
    header=st.dictionaries(st.sampled_from(["typ", "alg", "jwk"]), json_values, max_size=3),
    claims=st.dictionaries(
        st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]), json_values, max_size=6
    ),
    omitted=st.sets(st.sampled_from(["typ", "alg", "jwk", "jti", "htm", "htu", "iat", "ath"])),
)
async def test_generated_headers_and_claims_pass_only_when_each_is_right(
    header: dict[str, Any], claims: dict[str, Any], omitted: set[str]
) -> None:
    state = RecordingState()
    dpop = nonce_verifier(lambda: NOW, state)
    nonce = dpop.current_nonce()
    assert nonce is not None
    header_part = {name: OMIT for name in omitted if name in ("typ", "alg", "jwk")} | header
    claims_part = (
        {"nonce": nonce}
        | {name: OMIT for name in omitted if name not in ("typ", "alg", "jwk")}
        | claims
    )
    value = proof(extra_header=header_part, extra_claims=claims_part)
    generated = {**header, **claims}
    expected = not (omitted - set(generated)) and all(
        _valid_member(name, member, nonce) for name, member in generated.items()
    )
    try:
        jkt = await check(dpop, value)
    except (InvalidDpopProofError, UseDpopNonceError):
        assert not expected
        assert state.calls == []
    else:
        assert expected
        assert jkt == dpop_key("ES256").thumbprint


# --- generated URLs ------------------------------------------------------------------

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
OTHER_PCHARS = "!$&'()*+,;=:@"
DEFAULT_PORT = {"http": 80, "https": 443}

atoms = st.one_of(
    st.sampled_from(UNRESERVED + OTHER_PCHARS),
    st.integers(0, 255).filter(lambda b: chr(b) not in UNRESERVED).map(lambda b: f"%{b:02X}"),
)
segments = st.lists(atoms, max_size=6).map("".join).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=5)
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z]{2,5}){0,2}", fullmatch=True)
ports = st.none() | st.integers(1, 65535)


def canonical(scheme: str, host: str, port: int | None, path: list[str]) -> str:
    port_part = "" if port in (None, DEFAULT_PORT[scheme]) else f":{port}"
    return f"{scheme}://{host}{port_part}/{'/'.join(path)}"


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.swapcase() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def spelled(draw: st.DrawFn, scheme: str, host: str, port: int | None, path: list[str]) -> str:
    """Another spelling of ``canonical(scheme, host, port, path)``."""

    def respell(atom: str, *, lower: bool = False) -> str:
        if atom.startswith("%"):
            return "%" + random_case(draw, atom[1:])  # hex digits in any case
        if atom in UNRESERVED and draw(st.booleans()):
            return "%" + random_case(draw, f"{ord(atom):02x}")
        return atom

    def respell_text(text: str) -> str:
        return "".join(respell(a) for a in _atoms(text))

    host_part = "".join(respell(c) if c in UNRESERVED else c for c in random_case(draw, host))
    if port is None:
        port_part = draw(st.sampled_from(["", ":", f":{DEFAULT_PORT[scheme]}"]))
    else:
        port_part = ":" + "0" * draw(st.integers(0, 2)) + str(port)
    spelled_path = [respell_text(segment) for segment in path]
    if spelled_path:
        at = draw(st.integers(0, len(spelled_path) - 1))
        detour = draw(st.sampled_from([["."], ["x", ".."], ["%2E"], ["a", "%2e%2E"]]))
        spelled_path[at:at] = detour
    tail = draw(st.sampled_from(["", "?q=1", "#frag", "?a=/../b#c"]))
    return f"{random_case(draw, scheme)}://{host_part}{port_part}/{'/'.join(spelled_path)}{tail}"


def _atoms(text: str) -> list[str]:
    out: list[str] = []
    index = 0
    while index < len(text):
        step = 3 if text[index] == "%" else 1
        out.append(text[index : index + step])
        index += step
    return out


@given(
    data=st.data(), scheme=st.sampled_from(["http", "https"]), host=hosts, port=ports, path=paths
)
def test_equivalent_spellings_of_a_url_normalise_equal(
    data: st.DataObject, scheme: str, host: str, port: int | None, path: list[str]
) -> None:
    expected = canonical(scheme, host, port, path)
    assert normalize_htu(expected) == expected
    assert normalize_htu(data.draw(spelled(scheme, host, port, path))) == expected


@given(
    data=st.data(),
    scheme=st.sampled_from(["http", "https"]),
    host=hosts,
    port=ports,
    path=paths,
    other=paths,
)
def test_a_url_with_another_path_never_normalises_equal(
    data: st.DataObject, scheme: str, host: str, port: int | None, path: list[str], other: list[str]
) -> None:
    assume(canonical(scheme, host, port, path) != canonical(scheme, host, port, other))
    url = data.draw(spelled(scheme, host, port, path))
    other_url = data.draw(spelled(scheme, host, port, other))
    assert normalize_htu(url) != normalize_htu(other_url)
