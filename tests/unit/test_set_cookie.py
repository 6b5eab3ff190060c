"""Our cookies cannot be planted: a Set-Cookie is judged by the name a browser would store
it under (RFC 6265bis §5.6), the same filter for the relay and for token capture."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import build_app
from gateway.set_cookie import CookieGuard, parse_set_cookie_name
from gateway.settings import parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.raw_http import RawConn, raw_servers

OURS = frozenset({"__Host-tokengate", "__Host-tokengate-login"})
GUARD = CookieGuard(OURS)


def browser_name(header: str) -> str | None:
    """The RFC 6265bis §5.6 steps, written out as the spec words them: the name a browser
    stores, or None when it ignores the header; for a nameless cookie, the name a server
    reads from the value the browser sends back alone."""
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in header):
        return None  # step 1: a control character other than HTAB: ignore the cookie
    name_value_pair = header[: header.index(";")] if ";" in header else header
    if "=" not in name_value_pair:
        name, value = "", name_value_pair  # step 3: no "=": the name is empty
    else:
        position = name_value_pair.index("=")
        name, value = name_value_pair[:position], name_value_pair[position + 1 :]
    name, value = name.strip(" \t"), value.strip(" \t")  # step 4
    if name:
        return name
    # Sent back as "value" alone (§5.7.2): a server splits it at its first "=".
    return value.split("=", 1)[0].strip(" \t")


@pytest.mark.parametrize(
    "header",
    [
        "__Host-tokengate=planted; Path=/; Secure",
        "__Host-tokengate =planted; Path=/; Secure",
        "__Host-tokengate\t=planted",
        " __Host-tokengate=planted",
        "\t__Host-tokengate = planted",
        "=__Host-tokengate=planted; Path=/; Secure",
        "= __Host-tokengate=planted",
        "__Host-tokengate",
        "__Host-tokengate-login=planted; Path=/auth",
        "__Host-tokengate-login =planted",
        "=__Host-tokengate-login=x",
        "__Host-tokengate=a\x00b",  # ignored by browsers: dropped all the same
    ],
)
def test_every_spelling_of_our_cookie_is_refused(header: str) -> None:
    assert GUARD.plants(header)


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("app=1; Path=/", "app"),
        ("__host-tokengate=x", "__host-tokengate"),  # names compare case-sensitively
        ("X-Note=__Host-tokengate=y", "X-Note"),
        ("__Host-tokengatex=1", "__Host-tokengatex"),
        ("=app=1", "app"),
        ("", ""),
    ],
)
def test_other_cookies_pass_under_the_name_a_browser_gives_them(header: str, name: str) -> None:
    assert parse_set_cookie_name(header) == name
    assert not GUARD.plants(header)


def test_no_names_no_guard() -> None:
    assert not CookieGuard(frozenset())
    assert GUARD


_PIECES = st.sampled_from(
    [
        "__Host-tokengate",
        "__Host-tokengate-login",
        "__host-tokengate",
        "=",
        " ",
        "\t",
        ";",
        "Path=/",
        "Secure",
        "HttpOnly",
        "x",
        "app",
        "\x00",
        "\r",
        "\x7f",
        "\u00a0",
        '"',
        ",",
    ]
)
SET_COOKIES = st.lists(_PIECES | st.text(max_size=4), max_size=10).map("".join)


@given(SET_COOKIES)
def test_a_generated_set_cookie_never_plants_our_cookie(header: str) -> None:
    stored_as = browser_name(header)
    if stored_as is None or stored_as in OURS:
        assert GUARD.plants(header)
    else:
        assert not GUARD.plants(header)
        assert parse_set_cookie_name(header) == stored_as


@given(st.text())
def test_any_text_gets_a_verdict(header: str) -> None:
    assert GUARD.plants(header) == (browser_name(header) in (None, *OURS))
    name = parse_set_cookie_name(header)
    assert name is None or not re.search(r"^[ \t]|[ \t]$|;", name)


# -- through the relay ----------------------------------------------------------------


@pytest.fixture
async def relay(aiohttp_client: Any, issuer: FakeIssuer) -> AsyncIterator[Any]:
    """A gateway with sessions (so it has cookies to protect) in front of a raw upstream
    that sets the cookie named in the request's X-Plant header, and an app cookie."""

    async def script(conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            plant = (request.header("x-plant") or "").encode("latin-1")
            await conn.send(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: %s\r\nSet-Cookie: app=1\r\n"
                b"Content-Length: 2\r\n\r\nok" % plant
            )

    async with raw_servers() as start:
        server = await start(script)
        config = base_config(issuer.url, f"http://127.0.0.1:{server.port}")
        config["oidc"]["client_id"] = "spa"
        config["session"] = {"store": "memory"}
        config["routes"].append(
            {"prefix": "/app", "upstream": f"http://127.0.0.1:{server.port}", "auth": "session"}
        )
        yield await aiohttp_client(build_app(parse_settings(config)))


def relayed(values: list[str]) -> set[str | None]:
    return {browser_name(value) for value in values}


@pytest.mark.parametrize(
    "plant",
    [
        "__Host-tokengate =planted; Path=/; Secure",
        "__Host-tokengate\t=planted; Path=/; Secure",
        "=__Host-tokengate=planted; Path=/; Secure",
        "__Host-tokengate-login =planted; Path=/",
        "=__Host-tokengate-login=planted",
    ],
)
async def test_the_relay_drops_every_spelling_of_our_cookie(relay: Any, plant: str) -> None:
    resp = await relay.get("/public/x", headers={"X-Plant": plant})
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == ["app=1"]


_HEADER_SAFE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(["\t"]),
    max_size=6,
)


@given(st.lists(_PIECES.filter(lambda p: p.isprintable() or p == "\t") | _HEADER_SAFE, max_size=8))
async def test_no_generated_set_cookie_plants_our_cookie_through_the_relay(
    relay: Any, pieces: list[str]
) -> None:
    plant = "".join(pieces).strip(" \t")
    resp = await relay.get("/public/x", headers={"X-Plant": plant})
    assert resp.status == 200
    names = relayed(resp.headers.getall("Set-Cookie"))
    assert not names & OURS
    assert None not in names
