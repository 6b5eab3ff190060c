"""Token capture fails closed: the browser gets a login API's reply rebuilt from its JSON
object without a token in it, or our JSON 502, and never the upstream's bytes as they came.

Every leak a red team found is an example here, through the gateway in front of a fake
login API on loopback (raw servers for the odd framings, through both upstream clients):
tokens as array elements, keys or inside longer strings, bodies that are no JSON object,
transfer- and content-codings, failed logins with tokens under other names, claims paths
at a list or an object. Generated documents check the filter itself, then the gateway.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import assume, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.app import build_app
from gateway.bff.capture import (
    TokenFilter,
    parse_claims,
    parse_known_tokens,
    strip_tokens,
)
from gateway.idp.json_paths import holds_jwt, holds_opaque_token, parse_json_object
from gateway.settings import JsonResponsePaths, parse_settings
from tests.fakes.raw_http import RawConn, Script, raw_servers

Gateway = TestClient[Any, Any]


def unverified_jwt(**claims: Any) -> str:
    """A JWT as a login API hands it over; the signature is never checked on this path."""

    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{part('signature')}"


ACCESS = unverified_jwt(sub="alice-jwt", exp=4_000_000_000, scope="api")
REFRESH = "8xq2Zr0bT4mWv9Lk3NcYp6Hs1JdFa5Ge7UiOo2RtQw"  # opaque, as most refresh tokens are
ID_TOKEN = unverified_jwt(sub="alice-jwt", aud="spa", nonce="n-1")
TOKENS = (ACCESS, REFRESH, ID_TOKEN)
PATHS = {"access_token": "accessToken", "refresh_token": "refreshToken", "expires_in": None}
RESPONSE_PATHS = JsonResponsePaths(**PATHS)
UNREADABLE = {
    "error": "upstream_unavailable",
    "error_description": "the login reply is not a JSON object that can be relayed safely",
}


@dataclass
class LoginApi:
    """A login API whose reply is scripted: status, body bytes and headers."""

    status: int = 200
    body: bytes = b"{}"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def answer(self, value: Any, status: int = 200, headers: Any = ()) -> None:
        self.answer_bytes(json.dumps(value).encode(), status, [*headers])

    def answer_bytes(
        self, body: bytes, status: int = 200, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status, self.body = status, body
        self.headers = [("Content-Type", "application/json"), *(headers or [])]

    def web_app(self) -> web.Application:
        async def login(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(
                status=self.status, body=self.body, headers=CIMultiDict(self.headers)
            )

        app = web.Application()
        app.router.add_post("/User/Login", login)
        return app


def capture_config(
    upstream_url: str, *, client: str = "http1", claims_paths: dict[str, str] | None = None
) -> dict[str, Any]:
    """A capture-only tokengate: a login API and nothing else, no OIDC."""
    return {
        "public_url": "http://127.0.0.1:8080",
        "session": {"store": "memory", "cookie_name": "tokengate", "cookie_secure": False},
        "limits": {"shutdown_delay_s": 0},
        "upstream": {"client": client},
        "routes": [
            {
                "prefix": "/User/Login",
                "upstream": upstream_url,
                "auth": "none",
                "capture_tokens": {
                    "response": PATHS,
                    "subject_path": "user.name",
                    "claims_paths": claims_paths or {},
                },
            }
        ],
    }


Start = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def login_api(aiohttp_server: Any) -> tuple[LoginApi, str]:
    api = LoginApi()
    server = await aiohttp_server(api.web_app(), host="127.0.0.1")
    return api, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def start(aiohttp_client: Any, login_api: tuple[LoginApi, str]) -> Start:
    async def build(upstream_url: str | None = None, **config: Any) -> Gateway:
        settings_ = parse_settings(capture_config(upstream_url or login_api[1], **config))
        client: Gateway = await aiohttp_client(build_app(settings_))
        return client

    return build


@pytest.fixture
async def gateway(start: Start) -> Gateway:
    return await start()


@dataclass(frozen=True)
class Reply:
    """What the browser got from a login."""

    status: int
    raw: bytes
    headers: list[tuple[str, str]]

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    def started_a_session(self) -> bool:
        return any(v.startswith("tokengate=") for k, v in self.headers if k == "Set-Cookie")


async def login(gateway: Gateway) -> Reply:
    resp = await gateway.post(
        "/User/Login", json={"username": "alice", "password": "pw"}, headers={"X-CSRF": "1"}
    )
    raw = await resp.read()
    return Reply(resp.status, raw, list(resp.headers.items()))


async def session_info(gateway: Gateway) -> Any:
    resp = await gateway.get("/auth/session", headers={"X-CSRF": "1"})
    assert resp.status == 200
    return await resp.json()


def leaked(reply: Reply, tokens: tuple[str, ...] = TOKENS) -> list[str]:
    """The tokens anywhere in what the browser got: body, headers, cookies."""
    text = reply.raw.decode("utf-8", "replace") + repr(reply.headers)
    return [token for token in tokens if token in text]


def login_reply(**members: Any) -> dict[str, Any]:
    return {"accessToken": ACCESS, "refreshToken": REFRESH, **members}


# -- The filter's rules, on one reply --------------------------------------------------------


def test_strip_tokens_drops_configured_paths_token_names_and_token_values() -> None:
    paths = JsonResponsePaths(access_token="data.accessToken", refresh_token="data.refreshToken")
    reply = {
        "isSuccess": True,
        "data": {
            "accessToken": ACCESS,
            "refreshToken": REFRESH,
            "id_token": "id-1",  # named like a token: its value is known from here on
            "nested": [{"ID-Token": "id-2", "keep": 1}, "id-1 again"],
            "jwt": ACCESS,  # the access token again, under a name nobody configured
            "user": {"name": "Alice", "userAccessTokenCount": 3},
        },
    }
    known = parse_known_tokens(reply, paths)
    assert known == {ACCESS, REFRESH, "id-1", "id-2"}
    stripped = strip_tokens(reply, paths, TokenFilter(known, opaque=False))
    assert stripped == {
        "isSuccess": True,
        "data": {"nested": [{"keep": 1}], "user": {"name": "Alice"}},
    }
    assert reply["data"]["jwt"] == ACCESS  # the original is untouched


def test_only_a_failed_login_drops_opaque_looking_strings() -> None:
    reply = {"user": {"id": "3f2a1b4c-1234-4abc-9def-0123456789ab", "name": "Alice"}}
    ok = TokenFilter(frozenset(), opaque=False)
    failed = TokenFilter(frozenset(), opaque=True)
    assert strip_tokens(reply, RESPONSE_PATHS, ok) == reply
    assert strip_tokens(reply, RESPONSE_PATHS, failed) == {"user": {"name": "Alice"}}


def test_a_number_holding_a_known_token_is_dropped() -> None:
    tokens = TokenFilter(frozenset({"12345678"}), opaque=False)
    assert strip_tokens({"otp": 912345678, "n": 7}, RESPONSE_PATHS, tokens) == {"n": 7}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"[]",
        b"null",
        b'"x"',
        b")]}'\n{}",
        b"{}{}",
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": 1} x',
        b"\xff",
        b'{"a":' * 65 + b"1" + b"}" * 65,
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_parse_json_object_refuses_all_but_one_strict_json_object(raw: bytes) -> None:
    assert parse_json_object(raw) is None


def test_parse_json_object_takes_an_object_up_to_the_depth_limit() -> None:
    deep = b'{"a":' * 63 + b"1" + b"}" * 63
    assert parse_json_object(b' {"a": [1, {"b": null}]}\n') == {"a": [1, {"b": None}]}
    assert parse_json_object(deep) is not None


# -- Examples: each leak, through the gateway ------------------------------------------------


async def test_tokens_as_array_elements_never_reach_the_browser(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer(login_reply(all=[ACCESS, REFRESH, "kept"], ids=[[ID_TOKEN]]))
    reply = await login(gateway)
    assert reply.status == 200
    assert reply.started_a_session()
    assert reply.body == {"all": ["kept"], "ids": [[]]}
    assert leaked(reply) == []


async def test_tokens_inside_longer_strings_take_the_whole_string_with_them(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer(
        login_reply(
            authorization=f"Bearer {ACCESS}",
            cookie=f"refresh={REFRESH}",
            deep={"list": [f"x{REFRESH}y", {"note": f"id: {ID_TOKEN}"}]},
            welcome="Hello Alice",
        )
    )
    reply = await login(gateway)
    assert reply.status == 200
    assert reply.body == {"deep": {"list": [{}]}, "welcome": "Hello Alice"}
    assert leaked(reply) == []


async def test_a_token_as_a_member_name_takes_the_member_with_it(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer(
        login_reply(sessions={REFRESH: {"device": "web"}, f"jwt:{ID_TOKEN}": 1}, user={"id": 7})
    )
    reply = await login(gateway)
    assert reply.body == {"sessions": {}, "user": {"id": 7}}
    assert leaked(reply) == []


async def test_a_jwt_nobody_configured_is_dropped_under_any_name(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    other = unverified_jwt(sub="alice", aud="billing")  # not this reply's access token
    login_api[0].answer(login_reply(oidc={"jwt": other, "hint": f"use {other}"}, ok=True))
    reply = await login(gateway)
    assert reply.body == {"oidc": {}, "ok": True}
    assert leaked(reply, (*TOKENS, other)) == []


NOT_A_JSON_OBJECT = {
    "xssi_prefix": b")]}'\n" + json.dumps(login_reply()).encode(),
    "ndjson": json.dumps(login_reply()).encode() + b'\n{"more": true}\n',
    "html": f"<html><script>var token = '{ACCESS}';</script></html>".encode(),
    "form": f"access_token={ACCESS}&refresh_token={REFRESH}".encode(),
    "json_array": json.dumps([ACCESS, REFRESH]).encode(),
    "json_string": json.dumps(f"Bearer {ACCESS}").encode(),
    "nan": f'{{"accessToken": "{ACCESS}", "refreshToken": "{REFRESH}", "n": NaN}}'.encode(),
    "trailing_text": json.dumps(login_reply()).encode() + b" // " + REFRESH.encode(),
    "not_utf8": b'{"note": "\xff", "token": "' + REFRESH.encode() + b'"}',
    "nested_too_deep": b'{"a":' * 70 + json.dumps(REFRESH).encode() + b"}" * 70,
}


@pytest.mark.parametrize("status", [200, 401])
@pytest.mark.parametrize("body", NOT_A_JSON_OBJECT.values(), ids=NOT_A_JSON_OBJECT.keys())
async def test_a_body_that_is_no_json_object_is_a_502_never_relayed(
    gateway: Gateway, login_api: tuple[LoginApi, str], body: bytes, status: int
) -> None:
    login_api[0].answer_bytes(body, status, [("Content-Type", "text/html")])
    reply = await login(gateway)
    assert (reply.status, reply.body) == (502, UNREADABLE)
    assert not reply.started_a_session()
    assert leaked(reply) == []


async def test_a_failed_login_drops_tokens_under_any_name(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer(
        {
            "error": "mfa_required",
            "challenge": {"at": ACCESS, "rt": REFRESH, "list": [REFRESH, "sms"]},
            "hint": f"Bearer {ACCESS}",
            "retry": f"refresh={REFRESH}",
            "data": {"accessToken": "no-token-yet"},
            "trace": "3f2a1b4c-1234-4abc-9def-0123456789ab",
            "attempts": 2,
        },
        status=401,
    )
    reply = await login(gateway)
    assert reply.status == 401
    assert reply.body == {
        "error": "mfa_required",
        "challenge": {"list": ["sms"]},
        "data": {},
        "attempts": 2,
    }
    assert not reply.started_a_session()
    assert leaked(reply) == []


async def test_a_2xx_without_an_access_token_is_a_failed_login(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer({"message": "check your email", "magic": REFRESH})
    reply = await login(gateway)
    assert (reply.status, reply.body) == (200, {"message": "check your email"})
    assert not reply.started_a_session()


async def test_an_empty_reply_stays_empty(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer_bytes(b"", 401, [("WWW-Authenticate", "Basic")])
    reply = await login(gateway)
    assert (reply.status, reply.raw) == (401, b"")
    assert ("WWW-Authenticate", "Basic") in reply.headers
    assert not reply.started_a_session()


async def test_a_failed_logins_error_codes_and_messages_pass(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    body = {
        "isSuccess": False,
        "errorCode": "INVALID_CREDENTIALS",
        "message": "Invalid username or password",
        "retryAfter": 30,
        "help": "https://example.com/reset-password",
    }
    login_api[0].answer(body, status=400)
    reply = await login(gateway)
    assert (reply.status, reply.body) == (400, body)


async def test_token_headers_and_cookies_never_reach_the_browser(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer(
        login_reply(user={"name": "alice"}),
        headers=[
            ("X-Access-Token", "see the body"),
            ("X-Debug", f"Bearer {ACCESS}"),
            ("X-Id", ID_TOKEN),
            ("Link", f"</session?rt={REFRESH}>; rel=self"),
            ("Set-Cookie", f"refresh_token={REFRESH}; HttpOnly"),
            ("Set-Cookie", "tokengate=planted; Path=/"),
            ("Set-Cookie", "theme=dark"),
            ("X-Kept", "fine"),
        ],
    )
    reply = await login(gateway)
    assert reply.status == 200
    names = [name for name, _ in reply.headers]
    assert not {"X-Access-Token", "X-Debug", "X-Id", "Link"} & set(names)
    cookies = [v for k, v in reply.headers if k == "Set-Cookie"]
    assert "theme=dark" in cookies
    assert not any(v.startswith(("refresh_token=", "tokengate=planted")) for v in cookies)
    assert ("X-Kept", "fine") in reply.headers
    assert leaked(reply) == []


async def test_claims_paths_keep_scalars_only_and_auth_session_shows_no_token(
    start: Start, login_api: tuple[LoginApi, str]
) -> None:
    claims_paths = {
        "age": "user.age",
        "admin": "user.admin",
        "all": "all",
        "user": "user",
        "none": "user.none",
        "bearer": "user.bearer",
        "jwt": "user.jwt",
        "first": "all.0",
    }
    gateway = await start(claims_paths=claims_paths)
    login_api[0].answer(
        login_reply(
            all=[ACCESS, REFRESH],
            user={
                "name": "Alice",
                "age": 42,
                "admin": False,
                "none": None,
                "bearer": f"Bearer {ACCESS}",
                "jwt": ID_TOKEN,
            },
        )
    )
    reply = await login(gateway)
    assert reply.started_a_session()
    info = await session_info(gateway)
    assert info["claims"] == {"sub": "Alice", "age": 42, "admin": False}
    assert not any(token in json.dumps(info) for token in TOKENS)


async def test_a_subject_path_at_a_token_falls_back_to_the_jwts_sub(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    login_api[0].answer(login_reply(user={"name": f"Bearer {REFRESH}"}))
    reply = await login(gateway)
    assert reply.started_a_session()
    assert (await session_info(gateway))["claims"] == {"sub": "alice-jwt"}


async def test_a_successful_login_is_rebuilt_as_json(
    gateway: Gateway, login_api: tuple[LoginApi, str]
) -> None:
    # Two members of one name: what the browser gets is what we parsed, never the bytes.
    raw = f'{{"accessToken": "{ACCESS}", "refreshToken": "{REFRESH}", "a": "{REFRESH}", "a": 1}}'
    login_api[0].answer_bytes(raw.encode(), headers=[("ETag", '"v1"')])
    reply = await login(gateway)
    assert (reply.status, reply.raw) == (200, b'{"a":1}')
    assert ("Content-Type", "application/json; charset=utf-8") in reply.headers
    assert "ETag" not in dict(reply.headers)


@pytest.mark.parametrize(
    ("text", "jwt", "opaque"),
    [
        (ACCESS, True, True),
        (f"Bearer {ACCESS}", True, True),
        (f"session={ID_TOKEN}; Path=/", True, True),
        (f"x{ACCESS}", True, True),  # glued to other letters
        (unverified_jwt().rsplit(".", 1)[0] + ".", True, True),  # unsecured: no signature
        ("api.example.com", False, False),
        ("eyes.example.com", False, False),
        ("v1.2.3-rc.4", False, False),
        (REFRESH, False, True),
        ("3f2a1b4c-1234-4abc-9def-0123456789ab", False, True),  # a UUID looks like one
        ("INVALID_CREDENTIALS", False, False),
        ("Invalid username or password", False, False),
        ("https://example.com/reset-password", False, False),
        ("abcdefghijklmnopqrstuvwxyz", False, False),  # letters alone
        ("1234567890123456789012", False, False),  # digits alone
    ],
)
def test_the_shapes_of_a_token(text: str, jwt: bool, opaque: bool) -> None:
    assert (holds_jwt(text), holds_opaque_token(text)) == (jwt, opaque)


# -- Codings: refused before a byte is read, through both upstream clients -------------------


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


GZIPPED = gzip.compress(json.dumps(login_reply()).encode())
CODED_REPLIES = {
    "gzip_chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(GZIPPED),
    "gzip_then_chunked_lines": (
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(GZIPPED)
    ),
    "gzip_close_delimited": b"Transfer-Encoding: gzip\r\nConnection: close\r\n\r\n" + GZIPPED,
    "content_encoding_gzip": b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
    % (len(GZIPPED), GZIPPED),
}


def answer_once(response: bytes) -> Script:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response)
        await conn.close()

    return script


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
@pytest.mark.parametrize("framing", CODED_REPLIES.values(), ids=CODED_REPLIES.keys())
async def test_a_coded_login_reply_is_a_502_never_relayed(
    start: Start, framing: bytes, client: str
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    async with raw_servers() as serve:
        server = await serve(answer_once(head + framing))
        gateway = await start(f"http://127.0.0.1:{server.port}", client=client)
        reply = await login(gateway)
        assert reply.status == 502
        assert reply.body == UNREADABLE
        assert not reply.started_a_session()


async def test_plain_chunked_is_read(start: Start) -> None:
    body = json.dumps(login_reply(note="hi")).encode()
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    async with raw_servers() as serve:
        server = await serve(answer_once(head + chunked(body)))
        gateway = await start(f"http://127.0.0.1:{server.port}")
        reply = await login(gateway)
        assert (reply.status, reply.body) == (200, {"note": "hi"})
        assert reply.started_a_session()


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
async def test_a_byte_that_is_not_utf8_hides_no_token_nor_our_cookie(
    start: Start, client: str
) -> None:
    # Both clients decode 0xE9 as a lone surrogate, and aiohttp's serialiser drops it on the
    # way out: each header is judged as the browser gets it.
    body = json.dumps(login_reply(user={"name": "alice"})).encode()
    half = len(REFRESH) // 2
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Set-Cookie: tokengate\xe9=planted; Path=/\r\n"
        b"Set-Cookie: refresh\xe9Token=" + REFRESH.encode() + b"\r\n"
        b"X-Note: " + REFRESH[:half].encode() + b"\xe9" + REFRESH[half:].encode() + b"\r\n"
        b"X-Kept: fine\xe9\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    async with raw_servers() as serve:
        server = await serve(answer_once(head + body))
        gateway = await start(f"http://127.0.0.1:{server.port}", client=client)
        reply = await login(gateway)
        assert reply.status == 200
        assert reply.started_a_session()
        cookies = [v for k, v in reply.headers if k == "Set-Cookie"]
        assert not any(v.startswith(("tokengate=planted", "refreshToken=")) for v in cookies)
        assert "X-Note" not in dict(reply.headers)
        assert ("X-Kept", "fine") in reply.headers
        assert leaked(reply) == []


# -- Generated: the filter, then the gateway ---------------------------------------------------

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
OPAQUE_TOKENS = st.text(alphabet=B64URL, min_size=20, max_size=64).filter(
    lambda t: any(c.isdigit() for c in t) and any(c.isalpha() for c in t)
)
JWTS = st.builds(
    lambda header, claims, signature: ".".join(
        base64.urlsafe_b64encode(part).rstrip(b"=").decode()
        for part in (json.dumps(header).encode(), json.dumps(claims).encode(), signature)
    ),
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["RS256", "ES256", "none"])},
        optional={"kid": st.text(max_size=8), "typ": st.just("JWT")},
    ),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8), max_size=3),
    st.binary(max_size=64),
)


def planted(tokens: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Strings, many holding one of ``tokens`` whole: alone or inside other text."""
    text = st.text(max_size=6)
    inside = st.builds(lambda pre, token, post: pre + token + post, text, tokens, text)
    return st.one_of(text, tokens, inside)


def documents(strings: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON values whose strings, member names included, come from ``strings``."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | strings
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
        max_leaves=16,
    )


def survivors(value: Any, tokens: Any) -> list[str]:
    text = json.dumps(value, ensure_ascii=False)  # no token has a character JSON escapes
    return [token for token in tokens if token in text]


@given(doc=documents(planted(st.sampled_from(TOKENS))), failed=st.booleans())
def test_a_known_token_planted_anywhere_never_survives_the_filter(doc: Any, failed: bool) -> None:
    reply = login_reply(doc=doc, user={"idToken": ID_TOKEN})
    tokens = TokenFilter(parse_known_tokens(reply, RESPONSE_PATHS), opaque=failed)
    assert survivors(strip_tokens(reply, RESPONSE_PATHS, tokens), TOKENS) == []


@given(data=st.data(), failed=st.booleans())
def test_a_jwt_nobody_named_never_survives_the_filter(data: st.DataObject, failed: bool) -> None:
    jwts = data.draw(st.lists(JWTS, min_size=1, max_size=3))
    doc = data.draw(documents(planted(st.sampled_from(jwts))))
    reply = login_reply(doc=doc)
    tokens = TokenFilter(parse_known_tokens(reply, RESPONSE_PATHS), opaque=failed)
    assert survivors(strip_tokens(reply, RESPONSE_PATHS, tokens), jwts) == []


@given(data=st.data())
def test_an_opaque_token_under_any_name_never_survives_a_failed_login(
    data: st.DataObject,
) -> None:
    opaque = data.draw(st.lists(OPAQUE_TOKENS, min_size=1, max_size=3))
    doc = data.draw(documents(planted(st.sampled_from(opaque))))
    tokens = TokenFilter(parse_known_tokens(doc, RESPONSE_PATHS), opaque=True)
    reply = {"error": "invalid_grant", "doc": doc}
    assert survivors(strip_tokens(reply, RESPONSE_PATHS, tokens), opaque) == []


@given(
    doc=documents(planted(st.sampled_from(TOKENS))),
    paths=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.lists(
            st.sampled_from(["doc", "0", "1", "a", "b", "user", "idToken"]), min_size=1, max_size=4
        ).map(".".join),
        max_size=6,
    ),
)
def test_claims_are_scalars_that_hold_no_token(doc: Any, paths: dict[str, str]) -> None:
    reply = login_reply(doc=doc, user={"idToken": ID_TOKEN})
    tokens = TokenFilter(parse_known_tokens(reply, RESPONSE_PATHS), opaque=False)
    claims = parse_claims(reply, paths, tokens)
    assert all(isinstance(value, str | int | float) for value in claims.values())
    assert survivors(claims, TOKENS) == []


@pytest.fixture
async def claims_gateway(start: Start) -> Gateway:
    return await start(claims_paths={"doc": "doc", "first": "doc.0", "a": "doc.a"})


@given(doc=documents(planted(st.sampled_from(TOKENS))), status=st.sampled_from([200, 401]))
async def test_a_token_planted_anywhere_never_reaches_the_browser_nor_auth_session(
    claims_gateway: Gateway, login_api: tuple[LoginApi, str], doc: Any, status: int
) -> None:
    login_api[0].answer(login_reply(doc=doc, ids={"idToken": ID_TOKEN}), status=status)
    reply = await login(claims_gateway)
    assert reply.status == status
    assert leaked(reply) == []
    assert reply.started_a_session() == (status == 200)
    if reply.started_a_session():
        assert survivors(await session_info(claims_gateway), TOKENS) == []


def is_json_object(body: bytes) -> bool:
    """The test's own oracle: Python's parser without its NaN and Infinity."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        return isinstance(json.loads(body, parse_constant=refuse), dict)
    except (ValueError, RecursionError):
        return False


OBJECTS = documents(st.text(max_size=6)).map(lambda doc: {"accessToken": ACCESS, "doc": doc})
NOT_OBJECTS = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.text(min_size=1, max_size=50).map(str.encode),
    documents(planted(st.sampled_from(TOKENS)))
    .filter(lambda doc: not isinstance(doc, dict))
    .map(lambda doc: json.dumps(doc).encode()),
    st.builds(
        lambda prefix, obj: prefix + json.dumps(obj).encode(),
        st.sampled_from([b")]}'\n", b"while(1);", b"for(;;);", b"\x00", b"//"]),
        OBJECTS,
    ),
    st.builds(
        lambda obj, rest: json.dumps(obj).encode() + rest,
        OBJECTS,
        st.sampled_from([b"\n{}", b"]", b" x", b"\n" + REFRESH.encode(), b"{}"]),
    ),
    OBJECTS.map(lambda obj: json.dumps(obj)[:-1].encode() + b', "n": NaN}'),
)


@given(body=NOT_OBJECTS, status=st.sampled_from([200, 401, 500]))
async def test_a_body_that_is_no_json_object_never_reaches_the_browser(
    gateway: Gateway, login_api: tuple[LoginApi, str], body: bytes, status: int
) -> None:
    assume(not is_json_object(body))  # an object is the other properties' business
    login_api[0].answer_bytes(body, status)
    reply = await login(gateway)
    assert reply.status == 502
    assert reply.body == UNREADABLE
    assert not reply.started_a_session()
