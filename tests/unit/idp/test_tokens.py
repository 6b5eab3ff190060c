"""When a received access token expires: the earliest of its JWT ``exp`` and receipt +
``expires_in``, each only when it is a number we can read, else receipt + the default
lifetime. Checked on ``parse_expiry`` and on each of its callers: the OAuth 2.0 token
endpoint, token capture (the JSON dialect's are in ``test_json_dialect``).
"""

from __future__ import annotations

import base64
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from gateway.bff.capture import TokenCapture
from gateway.idp.discovery import Discovery
from gateway.idp.oauth2 import OAuth2Client
from gateway.idp.tokens import parse_expiry
from gateway.metrics import Metrics
from gateway.routing import Route
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session
from gateway.settings import (
    CaptureSettings,
    JsonResponsePaths,
    OidcSettings,
    RefreshSettings,
    RouteSettings,
    SessionSettings,
)

NOW = 1_700_000_000.0
DEFAULT_S = 300.0
ABSENT = object()


def unverified_jwt(**claims: Any) -> str:
    """A JWT as an IdP hands it over; the signature is never checked on this path."""

    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{part('signature')}"


@pytest.mark.parametrize(
    ("exp", "expires_in", "expected"),
    [
        (NOW + 60, 3600, NOW + 60),  # the JWT ends first
        (NOW + 3600, 60, NOW + 60),  # expires_in ends first
        (NOW + 3600, "60", NOW + 60),
        (NOW + 60.5, None, NOW + 60.5),
        (ABSENT, 120, NOW + 120),
        (ABSENT, None, NOW + DEFAULT_S),
        (NOW - 5, 3600, NOW - 5),  # already expired: refresh at once, not in an hour
    ],
)
def test_expiry_is_the_earliest_known(exp: Any, expires_in: Any, expected: float) -> None:
    token = unverified_jwt() if exp is ABSENT else unverified_jwt(exp=exp)
    assert parse_expiry(token, expires_in, DEFAULT_S, now=NOW) == expected


@pytest.mark.parametrize(
    "exp", ["1999999999", True, float("nan"), float("inf"), 10**400, None, [NOW + 60]]
)
def test_a_jwt_exp_that_is_not_a_finite_number_is_ignored(exp: Any) -> None:
    token = unverified_jwt(exp=exp)
    assert parse_expiry(token, 120, DEFAULT_S, now=NOW) == NOW + 120
    assert parse_expiry(token, None, DEFAULT_S, now=NOW) == NOW + DEFAULT_S


@pytest.mark.parametrize(
    "expires_in",
    [0, -5, "0", "", "-5", "1e3", "12.5", " 60", "²", "١٢٠", "9" * 400, True, 10**400,
     float("inf"), float("nan"), [60], {"s": 60}],
)  # fmt: skip
def test_expires_in_that_is_not_a_positive_finite_number_is_ignored(expires_in: Any) -> None:
    assert parse_expiry("opaque", expires_in, DEFAULT_S, now=NOW) == NOW + DEFAULT_S
    token = unverified_jwt(exp=NOW + 42)
    assert parse_expiry(token, expires_in, DEFAULT_S, now=NOW) == NOW + 42


def readable_number(value: Any) -> float | None:
    """The rule, restated: a finite number (a digit string for ``expires_in``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        return None
    return float(value) if math.isfinite(value) else None


NUMBERS = st.integers() | st.floats() | st.just(10**400)
ANY_VALUE = NUMBERS | st.text(max_size=6) | st.booleans() | st.none() | st.lists(NUMBERS)


@given(
    exp=st.just(ABSENT) | ANY_VALUE,
    expires_in=ANY_VALUE | st.from_regex(r"[0-9]{1,400}", fullmatch=True),
    token_is_a_jwt=st.booleans(),
)
def test_expiry_is_never_later_than_the_jwt_exp_or_receipt_plus_expires_in(
    exp: Any, expires_in: Any, token_is_a_jwt: bool
) -> None:
    claims = {} if exp is ABSENT else {"exp": exp}
    token = unverified_jwt(**claims) if token_is_a_jwt else "opaque-token"
    expiry = parse_expiry(token, expires_in, DEFAULT_S, now=NOW)
    known = []
    if token_is_a_jwt and (jwt_exp := readable_number(exp)) is not None:
        known.append(jwt_exp)
    if isinstance(expires_in, str) and expires_in.isascii() and expires_in.isdigit():
        expires_in = float(expires_in)
    if (lifetime := readable_number(expires_in)) is not None and lifetime > 0:
        known.append(NOW + lifetime)
    assert all(expiry <= bound for bound in known)
    assert expiry == (min(known) if known else NOW + DEFAULT_S)
    assert math.isfinite(expiry)


@given(st.text() | st.text(alphabet="abcXYZ019-_.=", max_size=60))
def test_any_string_as_an_access_token_gets_an_expiry(token: str) -> None:
    assert math.isfinite(parse_expiry(token, None, DEFAULT_S, now=NOW))


Serve = Callable[..., Awaitable[TestServer]]


async def exchange(aiohttp_server: Serve, reply: dict[str, Any]) -> tuple[Any, float, float]:
    """A code exchange at a token endpoint that answers ``reply``: (the tokens, and the
    clock before and after, which bound the receipt time)."""

    async def token(request: web.Request) -> web.Response:
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app, host="127.0.0.1")
    oidc = OidcSettings(client_id="bff")
    refresh = RefreshSettings(token_endpoint=str(server.make_url("/token")))
    async with aiohttp.ClientSession() as http:
        client = OAuth2Client(oidc, refresh, Discovery(oidc, http), http, Metrics())
        before = time.time()
        tokens = await client.exchange_code("code", "verifier", "https://app.example/cb")
        after = time.time()
    return tokens, before, after


async def test_oauth2_expiry_is_the_jwt_exp_when_it_ends_before_expires_in(
    aiohttp_server: Serve,
) -> None:
    exp = int(time.time()) + 60
    reply = {"access_token": unverified_jwt(exp=exp), "expires_in": 3600}
    tokens, _, _ = await exchange(aiohttp_server, reply)
    assert tokens.expires_at == exp


async def test_oauth2_expiry_is_receipt_plus_expires_in_when_it_ends_first(
    aiohttp_server: Serve,
) -> None:
    reply = {"access_token": unverified_jwt(exp=time.time() + 3600), "expires_in": 60}
    tokens, before, after = await exchange(aiohttp_server, reply)
    assert before + 60 <= tokens.expires_at <= after + 60


async def test_oauth2_ignores_an_exp_that_is_not_a_number(aiohttp_server: Serve) -> None:
    for exp in ("1999999999", 1e400):  # 1e400 is inf to Python's json
        reply = {"access_token": unverified_jwt(exp=exp)}
        tokens, before, after = await exchange(aiohttp_server, reply)
        assert before + DEFAULT_S <= tokens.expires_at <= after + DEFAULT_S


async def test_oauth2_reply_scope_splits_on_spaces_only(aiohttp_server: Serve) -> None:
    reply = {"access_token": "opaque", "scope": "openid\u00a0api.read  profile"}
    tokens, _, _ = await exchange(aiohttp_server, reply)
    assert tokens.scopes == ("openid\u00a0api.read", "profile")


class CannedReply:
    """An upstream's login reply, as ``upstream.UpstreamReply``."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.status = 200
        self.reason = "OK"
        self.headers = [("Content-Type", "application/json")]
        self._body = json.dumps(body).encode()
        self.content_length = len(self._body)

    async def read(self) -> bytes:
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


async def captured_session(body: dict[str, Any]) -> Session:
    """The session token capture starts from a login reply ``body``."""
    session_settings = SessionSettings(store="memory")
    store = MemorySessionStore(session_settings, clock=lambda: NOW)
    cookies = SessionCookies(session_settings)
    capture = TokenCapture(store, cookies, DEFAULT_S, Metrics(), clock=lambda: NOW)
    settings = CaptureSettings(
        response=JsonResponsePaths(
            access_token="data.accessToken",
            refresh_token="data.refreshToken",
            expires_in="data.expiresIn",
        )
    )
    route = Route.from_settings(
        RouteSettings(
            name="login",
            prefix="/User/Login",
            upstream="http://127.0.0.1:9",
            auth="none",
            capture_tokens=settings,
        )
    )
    request = make_mocked_request("POST", "/User/Login")
    response = await capture.relay(request, route, CannedReply(body), settings)
    handle = cookies.handle_of(response.cookies[cookies.name].value)
    assert handle is not None
    session = await store.load(handle)
    assert session is not None
    return session


@pytest.mark.parametrize(
    ("exp", "expires_in", "expected"),
    [
        (NOW + 42, 3600, NOW + 42),
        (NOW + 3600, 42, NOW + 42),
        ("1999999999", 42, NOW + 42),
        ("1999999999", None, NOW + DEFAULT_S),
    ],
)
async def test_a_captured_session_expires_at_the_earliest_known(
    exp: Any, expires_in: Any, expected: float
) -> None:
    data: dict[str, Any] = {"accessToken": unverified_jwt(sub="alice", exp=exp)}
    if expires_in is not None:
        data["expiresIn"] = expires_in
    session = await captured_session({"data": data})
    assert session.access_expires_at == expected


async def test_a_captured_sessions_scopes_split_on_spaces_only() -> None:
    access = unverified_jwt(sub="alice", exp=NOW + 60, scope="api.read\u00a0api.admin api.x")
    session = await captured_session({"data": {"accessToken": access}})
    assert session.scopes == ("api.read\u00a0api.admin", "api.x")
