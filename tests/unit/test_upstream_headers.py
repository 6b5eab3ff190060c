"""The request headers for the upstream, built as bytes from the client's raw header bytes.

``test_forwarded_headers`` holds the properties of identity and forwarding headers; here,
the rest of what ``Upstream.build_headers`` decides (names the client's ``Connection`` lists,
our cookies, the trace context, DPoP, claims that cannot be sent), generated, and what the
bytes are: the client's exactly as it sent them, through the pool to a raw upstream.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.app import build_app
from gateway.context import open_context
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.routing import Route
from gateway.settings import RouteSettings, parse_settings
from gateway.tracing import TraceIds
from gateway.upstream import HOP_BY_HOP, Upstream, UpstreamHeaders
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.raw_http import RawConn, raw_servers

OWN_COOKIES = frozenset({"__Host-tokengate", "tokengate_login"})
ROUTE = Route.from_settings(
    RouteSettings(
        prefix="/who",
        upstream="http://127.0.0.1:9",
        auth="bearer",
        identity_headers={"X-User-Id": "sub", "X-Email": "email"},
    )
)
NONE_ROUTE = Route.from_settings(
    RouteSettings(prefix="/public", upstream="http://127.0.0.1:9", auth="none")
)
PEER = "203.0.113.9"
TRACE = TraceIds(trace_id=0xABC, span_id=0xDEF, sampled=True, tracestate="ours=1")


def principal(dpop_jkt: str | None = None, **claims: Any) -> Principal:
    return Principal(
        subject="alice",
        scopes=frozenset(),
        claims={"sub": "alice", **claims},
        expires_at=0.0,
        access_token="tok",
        dpop_jkt=dpop_jkt,
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_upstream(http: aiohttp.ClientSession, **options: Any) -> Upstream:
    return Upstream(
        http,
        None,
        Metrics(),
        max_body_bytes=1024,
        public_url="https://app.example.com",
        own_cookies=OWN_COOKIES,
        **options,
    )


def build(
    upstream: Upstream,
    sent: list[tuple[str, str]],
    *,
    route: Route = ROUTE,
    who: Principal | None = None,
    trace: TraceIds | None = None,
) -> UpstreamHeaders:
    request = make_mocked_request("GET", "/who", headers=CIMultiDict(sent)).clone(remote=PEER)

    def in_a_request() -> UpstreamHeaders:
        ctx = open_context("rid-1")
        ctx.trace = trace
        return upstream.build_headers(request, route, who)

    return contextvars.copy_context().run(in_a_request)


# UpstreamHeaders ------------------------------------------------------------------------------


def test_set_replaces_every_spelling_and_remove_takes_them_all() -> None:
    headers = UpstreamHeaders([(b"Accept", b"a"), (b"x-one", b"1"), (b"X-ONE", b"2")])
    headers.set("X-One", "3")
    assert headers.pairs == [(b"Accept", b"a"), (b"X-One", b"3")]
    headers.remove("accept")
    assert headers.pairs == [(b"X-One", b"3")]
    assert headers.getall("x-one") == ["3"]


def test_items_decode_as_aiohttp_does_and_set_encodes_back_losslessly() -> None:
    headers = UpstreamHeaders([(b"X-Bytes", b"\xe9\xff"), (b"X-Text", "é".encode())])
    assert headers.items() == [("X-Bytes", "\udce9\udcff"), ("X-Text", "é")]
    headers.set("X-Bytes", "\udce9\udcff")
    assert headers.pairs[-1] == (b"X-Bytes", b"\xe9\xff")


# What build_headers decides, generated ------------------------------------------------------

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz-_"
plain_names = st.text(TOKEN_CHARS, min_size=1, max_size=10).filter(
    lambda n: n.replace("_", "-").strip("-") == n.replace("_", "-")
)
values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10)
cookie_names = st.sampled_from([*sorted(OWN_COOKIES), "theme", "lang", "__Host-other"])
cookie_parts = st.lists(
    st.tuples(cookie_names, st.text("abc123", max_size=4)), min_size=1, max_size=4
)


@st.composite
def client_headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Plain headers, the names a Connection header lists, cookies and trace context."""
    plain = draw(st.lists(st.tuples(plain_names.map(lambda n: f"x-t-{n}"), values), max_size=6))
    names = [name for name, _ in plain]
    listed = draw(st.lists(st.sampled_from(names), max_size=3)) if names else []
    sent = list(plain)
    if listed or draw(st.booleans()):
        sent.append(("Connection", ", ".join(["keep-alive", *listed])))
    for parts in draw(st.lists(cookie_parts, max_size=2)):
        sent.append(("Cookie", "; ".join(f"{name}={value}" for name, value in parts)))
    if draw(st.booleans()):
        sent.append(("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
    if draw(st.booleans()):
        sent.append(("tracestate", "theirs=1"))
    return draw(st.permutations(sent))


def listed_names(sent: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in sent
        if name.lower() == "connection"
        for token in value.split(",")
    }


def expected_cookie(sent: list[tuple[str, str]]) -> list[str]:
    parts = [
        part.strip()
        for name, value in sent
        if name.lower() == "cookie"
        for part in value.split(";")
        if part.strip() and part.strip().partition("=")[0] not in OWN_COOKIES
    ]
    return ["; ".join(parts)] if parts else []


@given(sent=client_headers(), traced=st.booleans())
def test_connection_names_our_cookies_and_trace_context_never_pass_as_sent(
    http: aiohttp.ClientSession, sent: list[tuple[str, str]], traced: bool
) -> None:
    headers = build(make_upstream(http), sent, who=principal(), trace=TRACE if traced else None)
    got = headers.items()
    listed = listed_names(sent)
    passed = {"traceparent", "tracestate"} if not traced else set()
    plain = [
        (k, v)
        for k, v in sent
        if k.lower() not in HOP_BY_HOP | {"cookie"} | listed
        and (k.lower().startswith("x-") or k.lower() in passed)
    ]
    assert [(k, v) for k, v in got if k.lower() in {k.lower() for k, _ in plain}] == plain
    assert headers.getall("Cookie") == expected_cookie(sent)
    assert not {k.lower() for k, _ in got} & (HOP_BY_HOP | listed)
    if traced:
        assert headers.getall("traceparent") == [TRACE.traceparent()]
        assert headers.getall("tracestate") == ["ours=1"]
    # Every pair goes to the pool as bytes, the client's as it sent them.
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in headers.pairs)


def test_a_trace_without_tracestate_sends_none_of_the_callers(
    http: aiohttp.ClientSession,
) -> None:
    trace = TraceIds(trace_id=1, span_id=2, sampled=False)
    sent = [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("tracestate", "x=1")]
    headers = build(make_upstream(http), sent, who=principal(), trace=trace)
    assert headers.getall("traceparent") == [trace.traceparent()]
    assert headers.getall("tracestate") == []


def test_without_a_trace_of_ours_the_callers_trace_context_passes(
    http: aiohttp.ClientSession,
) -> None:
    sent = [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("tracestate", "x=1")]
    headers = build(make_upstream(http), sent, who=principal())
    assert headers.getall("traceparent") == [sent[0][1]]
    assert headers.getall("tracestate") == ["x=1"]


@pytest.mark.parametrize(
    "email", ["a\r\nX-Admin: 1", "a\x00b", "ali\ud800ce", "\udce9", "x\x7f"], ids=repr
)
def test_a_claim_that_cannot_be_sent_as_it_is_is_not_forwarded(
    http: aiohttp.ClientSession, email: str
) -> None:
    headers = build(make_upstream(http), [("X-Email", "mallory")], who=principal(email=email))
    assert headers.getall("X-Email") == []
    assert headers.getall("X-User-Id") == ["alice"]


def test_a_claim_beyond_ascii_goes_as_utf8(http: aiohttp.ClientSession) -> None:
    headers = build(make_upstream(http), [], who=principal(email="zoë@example.com"))
    assert (b"X-Email", "zoë@example.com".encode()) in headers.pairs


def test_dpop_bound_token_as_bearer_drops_the_proof_and_sends_the_thumbprint(
    http: aiohttp.ClientSession,
) -> None:
    upstream = make_upstream(http, dpop_upstream="bearer", thumbprint_header="X-Jkt")
    bound = principal(dpop_jkt="jkt-1")
    sent = [("DPoP", "proof"), ("dpop", "proof2"), ("X-Jkt", "forged"), ("X_Jkt", "forged")]
    headers = build(upstream, sent, who=bound)
    assert headers.getall("DPoP") == []
    assert headers.getall("Authorization") == ["Bearer tok"]
    assert [(k, v) for k, v in headers.items() if k.lower().replace("_", "-") == "x-jkt"] == [
        ("X-Jkt", "jkt-1")
    ]
    as_received = build(make_upstream(http), sent, who=bound)
    assert as_received.getall("Authorization") == ["DPoP tok"]
    assert as_received.getall("DPoP") == ["proof", "proof2"]


def test_auth_none_forwards_the_clients_first_authorization(http: aiohttp.ClientSession) -> None:
    sent = [("Authorization", "Basic a"), ("authorization", "Basic b")]
    headers = build(make_upstream(http), sent, route=NONE_ROUTE)
    assert headers.getall("Authorization") == ["Basic a"]


# Bytes through the gateway --------------------------------------------------------------------


async def test_client_header_bytes_reach_the_upstream_as_sent(
    aiohttp_client: Any, issuer: FakeIssuer
) -> None:
    seen: list[bytes] = []

    async def script(conn: RawConn) -> None:
        request = await conn.read_request()
        if request is not None:
            seen.append(request.raw)
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with raw_servers() as start:
        server = await start(script)
        config = base_config(issuer.url, f"http://127.0.0.1:{server.port}")
        gateway = await aiohttp_client(build_app(parse_settings(config)))
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        writer.write(
            b"GET /public/x HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\n"
            b"X-Utf8: caf\xc3\xa9\r\nX-Keep: a\tb\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
        await writer.wait_closed()
    head = seen[0]
    for line in (b"X-Latin: caf\xe9\r\n", b"X-Utf8: caf\xc3\xa9\r\n", b"X-Keep: a\tb\r\n"):
        assert line in head
