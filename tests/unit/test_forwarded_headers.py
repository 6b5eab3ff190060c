"""Trust at the ingress: identity and forwarding headers reach the upstream as ours alone.

A client's spelling of a header we set (``X_User_Id`` for ``X-User-Id``: servers that read
'_' as '-' would take it) never reaches the upstream; forwarding headers are ours unless the
TCP peer is a configured trusted proxy. Through the app where a request shows it, and on
``Upstream.build_headers`` for the properties over generated headers.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.app import build_app
from gateway.context import open_context
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.routing import Route
from gateway.settings import ConfigError, RouteSettings, Settings, parse_settings
from gateway.upstream import FORWARDING_HEADERS, HOP_BY_HOP, Upstream
from tests.conftest import AiohttpClient, base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.upstream import FakeUpstream

Gateway = TestClient[Any, Any]
FakeUpstreamAt = tuple[FakeUpstream, str]

PUBLIC_URL = "https://app.example.com"
PUBLIC_HOST = "app.example.com"

# The headers upstream frameworks trust for the client's address, host or URL: a client
# (not a trusted proxy) must never be the one who sets them.
CLIENT_FORWARDING = {
    "Forwarded": "for=198.51.100.1;host=evil.example;proto=https",
    "X-Real-IP": "198.51.100.1",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/admin",
    "X-Original-URL": "/admin/delete",
    "X-Rewrite-URL": "/admin/delete",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "gopher",
    "X-Forwarded-Server": "evil.example",
    "X-Host": "evil.example",
    "X-Client-IP": "198.51.100.1",
    "True-Client-IP": "198.51.100.1",
    "X-Cluster-Client-IP": "198.51.100.1",
    "CF-Connecting-IP": "198.51.100.1",
    "Fastly-Client-IP": "198.51.100.1",
    "X-Forwarded-For": "198.51.100.1",
}


def with_identity_routes(config: dict[str, Any], upstream_url: str) -> dict[str, Any]:
    config["routes"] = [
        *config["routes"],
        {
            "prefix": "/who",
            "upstream": upstream_url,
            "auth": "bearer",
            "identity_headers": {"X-User-Id": "sub"},
        },
        {
            "prefix": "/wswho",
            "upstream": upstream_url + "/ws",
            "auth": "bearer",
            "websocket": True,
            "identity_headers": {"X-User-Id": "sub"},
        },
    ]
    return config


@pytest.fixture
def settings(issuer: FakeIssuer, upstream: FakeUpstreamAt) -> Settings:
    config = base_config(issuer.url, upstream[1], public_url=PUBLIC_URL)
    return parse_settings(with_identity_routes(config, upstream[1]))


def folded(name: str) -> str:
    """A header name as a server that reads '_' as '-' sees it."""
    return name.lower().replace("_", "-")


def spellings(headers: CIMultiDict[str], name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if folded(k) == folded(name)]


# Through the app --------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["X_User_Id", "x_user_id", "X-USER_ID", "X_User-Id"])
async def test_client_spelling_of_an_identity_header_with_underscores_never_reaches_upstream(
    gateway: Gateway, issuer: FakeIssuer, upstream: FakeUpstreamAt, spelling: str
) -> None:
    resp = await gateway.get(
        "/who/me",
        headers={"Authorization": f"Bearer {issuer.mint()}", spelling: "mallory"},
    )
    assert resp.status == 200
    seen = upstream[0].seen[-1].headers
    assert spellings(seen, "X-User-Id") == [("X-User-Id", "alice")]


async def test_client_spelling_of_an_identity_header_never_reaches_a_websocket_upstream(
    gateway: Gateway, issuer: FakeIssuer, upstream: FakeUpstreamAt
) -> None:
    async with gateway.ws_connect(
        "/wswho/chat",
        headers={
            "Authorization": f"Bearer {issuer.mint()}",
            "X_User_Id": "mallory",
            "X-Forwarded-Host": "evil.example",
        },
        protocols=("chat",),
    ) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
    seen = upstream[0].seen[-1].headers
    assert spellings(seen, "X-User-Id") == [("X-User-Id", "alice")]
    assert seen.getall("X-Forwarded-Host") == [PUBLIC_HOST]


async def test_forwarded_host_and_proto_are_public_url_whatever_host_the_client_sends(
    gateway: Gateway, upstream: FakeUpstreamAt
) -> None:
    resp = await gateway.get("/public/x", headers={"Host": "evil.example"})
    assert resp.status == 200
    seen = upstream[0].seen[-1].headers
    assert seen.getall("X-Forwarded-Host") == [PUBLIC_HOST]
    # The client spoke plain http to us (as behind a TLS-terminating load balancer); users
    # see https.
    assert seen.getall("X-Forwarded-Proto") == ["https"]


async def test_client_forwarding_headers_are_removed_or_ours(
    gateway: Gateway, upstream: FakeUpstreamAt
) -> None:
    resp = await gateway.get("/public/x", headers=CLIENT_FORWARDING)
    assert resp.status == 200
    seen = upstream[0].seen[-1].headers
    ours = {
        "x-forwarded-for": ["127.0.0.1"],
        "x-forwarded-host": [PUBLIC_HOST],
        "x-forwarded-proto": ["https"],
    }
    for name in CLIENT_FORWARDING:
        assert seen.getall(name, []) == ours.get(name.lower(), []), name


def test_every_client_forwarding_header_is_in_the_forwarding_set() -> None:
    assert {name.lower() for name in CLIENT_FORWARDING} <= FORWARDING_HEADERS


async def test_x_forwarded_for_from_an_untrusted_client_is_replaced_by_the_peer(
    gateway: Gateway, upstream: FakeUpstreamAt
) -> None:
    await gateway.get(
        "/public/x",
        headers=CIMultiDict([("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "10.0.0.1")]),
    )
    assert upstream[0].seen[-1].headers.getall("X-Forwarded-For") == ["127.0.0.1"]


@pytest.fixture
async def trusting_gateway(
    aiohttp_client: AiohttpClient, issuer: FakeIssuer, upstream: FakeUpstreamAt
) -> Gateway:
    config = base_config(
        issuer.url,
        upstream[1],
        public_url=PUBLIC_URL,
        forwarded={"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]},
    )
    settings = parse_settings(with_identity_routes(config, upstream[1]))
    return await aiohttp_client(build_app(settings))


async def test_trusted_proxy_forwarding_headers_pass_and_the_peer_is_appended(
    trusting_gateway: Gateway, issuer: FakeIssuer, upstream: FakeUpstreamAt
) -> None:
    sent = {name: value for name, value in CLIENT_FORWARDING.items() if name != "X-Forwarded-For"}
    resp = await trusting_gateway.get(
        "/who/me",
        headers={
            **sent,
            "X-Forwarded-For": "203.0.113.7, 10.1.2.3",
            "Authorization": f"Bearer {issuer.mint()}",
            # Never trusted, whoever sends them:
            "X-User-Id": "mallory",
            "X_Forwarded_For": "198.51.100.66",
            "X-Request-Id": "r-trusted",
        },
    )
    assert resp.status == 200
    seen = upstream[0].seen[-1].headers
    for name, value in sent.items():
        assert seen.getall(name) == [value], name
    assert spellings(seen, "X-Forwarded-For") == [
        ("X-Forwarded-For", "203.0.113.7, 10.1.2.3, 127.0.0.1")
    ]
    assert spellings(seen, "X-User-Id") == [("X-User-Id", "alice")]
    assert seen.getall("X-Request-Id") == [resp.headers["X-Request-Id"]]


async def test_trusted_proxy_that_sends_no_forwarding_headers_gets_ours(
    trusting_gateway: Gateway, upstream: FakeUpstreamAt
) -> None:
    await trusting_gateway.get("/public/x")
    seen = upstream[0].seen[-1].headers
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Host") == [PUBLIC_HOST]
    assert seen.getall("X-Forwarded-Proto") == ["https"]


# Settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-an-address", "10.0.0.0/8,10.1.0.0/16", ""])
def test_trusted_proxies_rejects_what_is_not_an_address_or_network(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"forwarded\.trusted_proxies"):
        parse_settings({"forwarded": {"trusted_proxies": [bad]}})


def test_trusted_proxies_are_kept_in_canonical_form() -> None:
    settings = parse_settings({"forwarded": {"trusted_proxies": ["10.1.2.3/8", "::1", "fd00::/8"]}})
    assert settings.forwarded.trusted_proxies == ("10.0.0.0/8", "::1/128", "fd00::/8")
    assert parse_settings({"forwarded": {"trusted_proxies": "192.0.2.1"}}).forwarded == (
        parse_settings({"forwarded": {"trusted_proxies": ["192.0.2.1/32"]}}).forwarded
    )


def test_trusted_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENGATE_FORWARDED__TRUSTED_PROXIES", '["10.0.0.0/8"]')
    settings = parse_settings({})
    assert settings.forwarded.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_no_proxy_is_trusted_by_default() -> None:
    assert parse_settings({}).forwarded.trusted_proxies == ()


# build_headers, directly --------------------------------------------------------------------

ROUTE = Route.from_settings(
    RouteSettings(
        prefix="/who",
        upstream="http://127.0.0.1:9",
        auth="bearer",
        identity_headers={"X-User-Id": "sub"},
    )
)
PRINCIPAL = Principal(
    subject="alice",
    scopes=frozenset(),
    claims={"sub": "alice"},
    expires_at=0.0,
    access_token="tok",
)
UNTRUSTED_PEER = "203.0.113.9"
TRUSTED_PEER = "10.1.2.3"
REQUEST_ID = "rid-1"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_upstream(
    http: aiohttp.ClientSession, public_url: str = PUBLIC_URL, trusted: tuple[str, ...] = ()
) -> Upstream:
    return Upstream(
        http,
        None,
        Metrics(),
        max_body_bytes=1024,
        public_url=public_url,
        trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted),
    )


def build(
    upstream: Upstream, headers: list[tuple[str, str]], peer: str = UNTRUSTED_PEER
) -> CIMultiDict[str]:
    request = make_mocked_request("GET", "/who", headers=CIMultiDict(headers)).clone(remote=peer)

    def in_a_request() -> CIMultiDict[str]:
        open_context(REQUEST_ID)
        return CIMultiDict(upstream.build_headers(request, ROUTE, PRINCIPAL).items())

    return contextvars.copy_context().run(in_a_request)


@pytest.mark.parametrize(
    ("public_url", "host"),
    [
        ("https://app.example.com", "app.example.com"),
        ("https://app.example.com:443", "app.example.com"),
        ("https://App.Example.com:8443/base", "app.example.com:8443"),
        ("http://[::1]:8080", "[::1]:8080"),
        ("https://bücher.example", "xn--bcher-kva.example"),
    ],
)
async def test_forwarded_host_is_public_url_host_with_a_port_only_when_not_default(
    http: aiohttp.ClientSession, public_url: str, host: str
) -> None:
    headers = build(make_upstream(http, public_url), [("Host", "evil.example")])
    assert headers.getall("X-Forwarded-Host") == [host]
    assert headers.getall("X-Forwarded-Proto") == [public_url.partition(":")[0]]


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 peer on a dual-stack socket
        ("fd00::1", True),
        ("11.0.0.1", False),
        ("::1", False),
        ("", False),  # a Unix socket
    ],
)
async def test_a_peer_is_trusted_only_inside_a_trusted_network(
    http: aiohttp.ClientSession, peer: str, trusted: bool
) -> None:
    upstream = make_upstream(http, trusted=("10.0.0.0/8", "fd00::/8"))
    headers = build(upstream, [("X-Forwarded-For", "198.51.100.1"), ("X-Real-IP", "1")], peer)
    if trusted:
        assert headers.getall("X-Forwarded-For") == [f"198.51.100.1, {peer}"]
        assert headers.getall("X-Real-IP") == ["1"]
    else:
        assert headers.getall("X-Forwarded-For") == [peer]
        assert "X-Real-IP" not in headers


async def test_trust_is_decided_per_peer_however_many_peers_come(
    http: aiohttp.ClientSession,
) -> None:
    upstream = make_upstream(http, trusted=("10.0.0.0/8",))
    request = make_mocked_request("GET", "/who", headers={"X-Forwarded-For": "198.51.100.1"})
    for n in range(5000):  # more peers than a process remembers
        peer = f"{10 + n % 2}.0.{n // 256 % 256}.{n % 256}"
        headers = upstream.build_headers(request.clone(remote=peer), ROUTE, PRINCIPAL)
        expected = f"198.51.100.1, {peer}" if peer.startswith("10.") else peer
        assert headers.getall("X-Forwarded-For") == [expected]


# Generated headers --------------------------------------------------------------------------

IDENTITY = "x-user-id"
# Every name the upstream must only see as we set it (or, for hop-by-hop and Host, as the
# connection does), whatever spelling of '_' and '-' and case a client uses.
CLAIMED = (
    FORWARDING_HEADERS
    | (HOP_BY_HOP - {"connection"})  # Connection's own rule is tested in test_proxy
    | {"host", "expect", "authorization", "cookie", "x-request-id", "content-length", IDENTITY}
)
OURS_UNTRUSTED = {
    "authorization": "Bearer tok",
    IDENTITY: "alice",
    "x-request-id": REQUEST_ID,
    "x-forwarded-for": UNTRUSTED_PEER,
    "x-forwarded-proto": "https",
    "x-forwarded-host": PUBLIC_HOST,
}


@st.composite
def respelled(draw: st.DrawFn, name: str) -> str:
    """``name`` with each letter's case and each '-' or '_' drawn anew."""
    return "".join(
        draw(st.sampled_from("-_"))
        if ch in "-_"
        else (ch.upper() if draw(st.booleans()) else ch.lower())
        for ch in name
    )


header_names = st.one_of(
    st.sampled_from(sorted(CLAIMED)).flatmap(respelled),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}", fullmatch=True).filter(
        lambda n: n.lower() != "connection"
    ),
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=12)


def passes_through(name: str, *, trusted: bool) -> bool:
    """Whether a client header of this name must reach the upstream as it was sent."""
    if folded(name) not in CLAIMED:
        return True
    if "_" in name:
        return False  # a spelling of one of ours
    if folded(name) == "content-length":
        return True
    return trusted and folded(name) in FORWARDING_HEADERS - {"x-forwarded-for"}


def expected_cookie(sent: list[tuple[str, str]]) -> list[str]:
    cookie = "; ".join(v for k, v in sent if k.lower() == "cookie")
    return [cookie] if cookie else []


@given(sent=header_lists)
def test_no_client_header_reaches_the_upstream_as_one_of_ours(
    http: aiohttp.ClientSession, sent: list[tuple[str, str]]
) -> None:
    headers = build(make_upstream(http), sent)
    for name, value in OURS_UNTRUSTED.items():
        assert [(k.lower(), v) for k, v in spellings(headers, name)] == [(name, value)]
    assert headers.getall("Cookie", []) == expected_cookie(sent)
    checked = OURS_UNTRUSTED.keys() | {"cookie"}
    others = [(k, v) for k, v in headers.items() if folded(k) not in checked]
    assert others == [(k, v) for k, v in sent if passes_through(k, trusted=False)]


@given(sent=header_lists)
def test_a_trusted_proxy_may_forward_but_never_claim_identity(
    http: aiohttp.ClientSession, sent: list[tuple[str, str]]
) -> None:
    upstream = make_upstream(http, trusted=("10.0.0.0/8",))
    headers = build(upstream, sent, TRUSTED_PEER)
    for name in ("authorization", IDENTITY, "x-request-id"):
        assert [(k.lower(), v) for k, v in spellings(headers, name)] == [
            (name, OURS_UNTRUSTED[name])
        ]
    chain = [v for k, v in sent if k.lower() == "x-forwarded-for" and v.strip()]
    assert [(k.lower(), v) for k, v in spellings(headers, "x-forwarded-for")] == [
        ("x-forwarded-for", ", ".join((*chain, TRUSTED_PEER)))
    ]
    for name, ours in (("x-forwarded-proto", "https"), ("x-forwarded-host", PUBLIC_HOST)):
        from_proxy = [v for k, v in sent if k.lower() == name]  # else ours
        assert [(k.lower(), v) for k, v in spellings(headers, name)] == [
            (name, v) for v in from_proxy or [ours]
        ]
    assert headers.getall("Cookie", []) == expected_cookie(sent)
    checked = {"authorization", IDENTITY, "x-request-id", "cookie"} | {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
    others = [(k, v) for k, v in headers.items() if folded(k) not in checked]
    assert others == [
        (k, v) for k, v in sent if folded(k) not in checked and passes_through(k, trusted=True)
    ]
