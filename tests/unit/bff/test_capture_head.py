"""Token capture writes the upstream's reason phrase and the header fields it keeps into a
head of its own: a CR, LF or other control character but HTAB in them is our JSON 502,
refused before a session is started, as ``Upstream.relay`` refuses it for any relayed
reply; never aiohttp refusing the head late (a 500 with nothing useful for the client).

``TokenCapture.relay`` with a canned upstream reply first, then through the gateway in
front of a raw login API (both upstream clients), then over generated reason phrases and
header values, each built response written by aiohttp's own serialiser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import build_app
from gateway.bff.capture import TokenCapture
from gateway.errors import UpstreamUnavailableError
from gateway.metrics import Metrics
from gateway.routing import Route
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.memory_store import MemorySessionStore
from gateway.settings import CaptureSettings, RouteSettings, SessionSettings, parse_settings
from tests.fakes.raw_http import raw_servers
from tests.fakes.upstream import CannedReply
from tests.unit.bff.test_capture_filter import (
    REFRESH,
    RESPONSE_PATHS,
    answer_once,
    capture_config,
    login,
    login_reply,
)

# What aiohttp's serialiser refuses, and ``upstream.refuse_controls`` with it: every
# control character but HTAB (RFC 9110 §5.5).
CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
CONTROL_BUT_TAB_BYTES = re.compile(CONTROL_BUT_TAB.pattern.encode())
SETTINGS = CaptureSettings(response=RESPONSE_PATHS, subject_path="user.name")
ROUTE = Route.from_settings(
    RouteSettings(
        name="login",
        prefix="/User/Login",
        upstream="http://127.0.0.1:9",
        auth="none",
        capture_tokens=SETTINGS,
    )
)
SUCCESS = json.dumps(login_reply(user={"name": "alice"})).encode()


def canned_login(
    reason: str = "OK", headers: Iterable[tuple[str, str]] = (), status: int = 200
) -> CannedReply:
    """A login API's reply already read off the wire (JSON, the tokens of a login)."""
    return CannedReply(
        status, reason, [("Content-Type", "application/json"), *headers], body=SUCCESS
    )


@dataclass
class Capture:
    """A ``TokenCapture`` over a memory store, with what it started."""

    capture: TokenCapture
    store: MemorySessionStore
    cookies: SessionCookies
    metrics: Metrics

    def sessions_created(self) -> float:
        value = self.metrics.registry.get_sample_value("tokengate_sessions_created_total")
        return 0.0 if value is None else value

    async def relay(self, reply: CannedReply) -> web.StreamResponse:
        request = make_mocked_request("POST", "/User/Login")
        return await self.capture.relay(request, ROUTE, reply, SETTINGS)


def new_capture() -> Capture:
    session_settings = SessionSettings(store="memory")
    store = MemorySessionStore(session_settings)
    cookies = SessionCookies(session_settings)
    metrics = Metrics()
    return Capture(TokenCapture(store, cookies, 300.0, metrics), store, cookies, metrics)


class Transport:
    """A client's socket: every byte aiohttp writes to it."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.data += chunk

    def is_closing(self) -> bool:
        return False


async def written(response: web.StreamResponse) -> bytes:
    """``response`` as aiohttp writes it to a client: its serialiser (the one that refuses a
    control character late) runs on the head."""
    transport = Transport()
    protocol = mock.Mock(transport=transport, _paused=False)
    writer = StreamWriter(protocol, asyncio.get_running_loop())
    request = make_mocked_request("POST", "/User/Login", writer=writer)
    await response.prepare(request)
    await response.write_eof()
    return bytes(transport.data)


# -- Examples, through TokenCapture.relay ----------------------------------------------------

HOSTILE_HEADS = {
    "crlf_in_reason": ("OK\r\nX-Injected: 1", []),
    "soh_in_reason": ("O\x01K", []),
    "del_in_value": ("OK", [("X-Note", "a\x7fb")]),
    "lf_in_value": ("OK", [("X-Note", "a\nX-Injected: 1")]),
    "nul_in_name": ("OK", [("X-No\x00te", "a")]),
}


@pytest.mark.parametrize("status", [200, 401])
@pytest.mark.parametrize(("reason", "headers"), HOSTILE_HEADS.values(), ids=HOSTILE_HEADS.keys())
async def test_a_control_character_in_the_kept_head_is_a_502_and_starts_no_session(
    reason: str, headers: list[tuple[str, str]], status: int
) -> None:
    capture = new_capture()
    reply = canned_login(reason, headers, status)
    with pytest.raises(UpstreamUnavailableError) as refused:
        await capture.relay(reply)
    assert refused.value.status == 502
    assert refused.value.body() == {
        "error": "upstream_unavailable",
        "error_description": "the upstream service is unavailable",
    }
    assert reply.released or reply.closed
    assert capture.sessions_created() == 0


async def test_a_bad_reason_phrase_is_refused_before_the_body_is_read() -> None:
    reply = canned_login("O\x01K")
    with pytest.raises(UpstreamUnavailableError):
        await new_capture().relay(reply)
    assert reply.closed  # the body went unread, and goes with its connection
    assert not reply.released


async def test_a_control_character_in_a_header_capture_drops_is_no_refusal() -> None:
    # None is written: hop-by-hop, a token-holding value (the token goes, and the field
    # with it), a Set-Cookie a browser would ignore (``CookieGuard`` drops it).
    capture = new_capture()
    dropped = [
        ("Keep-Alive", "timeout=5\x01"),
        ("X-Note", f"{REFRESH}\x7f"),
        ("Set-Cookie", "theme=dark\nX-Injected: 1"),
    ]
    response = await capture.relay(canned_login("OK", dropped, status=200))
    assert response.status == 200
    assert capture.sessions_created() == 1
    assert not {"Keep-Alive", "X-Note", "X-Injected"} & set(response.headers)
    assert [v for v in response.headers.getall("Set-Cookie", []) if v.startswith("theme")] == []


async def test_a_tab_is_relayed_and_the_session_started() -> None:
    capture = new_capture()
    reply = canned_login("Very\tOK", [("X-Note", "a\tb"), ("Set-Cookie", "theme=dark;\tPath=/")])
    response = await capture.relay(reply)
    assert (response.status, response.reason) == (200, "Very\tOK")
    assert response.headers["X-Note"] == "a\tb"
    assert capture.sessions_created() == 1
    head, _, body = (await written(response)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 Very\tOK\r\n")
    assert b"\r\nX-Note: a\tb\r\n" in head
    assert b"\r\nSet-Cookie: theme=dark;\tPath=/\r\n" in head
    assert f"\r\nSet-Cookie: {capture.cookies.name}=".encode() in head  # the session's
    assert json.loads(body) == {"user": {"name": "alice"}}


# -- Through the gateway, in front of a raw login API ----------------------------------------

RAW_HEADS = {
    "soh_in_reason": b"HTTP/1.1 200 O\x01K\r\n",
    "del_in_reason": b"HTTP/1.1 200 O\x7fK\r\n",
    "del_in_value": b"HTTP/1.1 200 OK\r\nX-Note: a\x7fb\r\n",
    "soh_in_value": b"HTTP/1.1 200 OK\r\nX-Note: a\x01b\r\n",
}


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
@pytest.mark.parametrize("head", RAW_HEADS.values(), ids=RAW_HEADS.keys())
async def test_a_control_character_from_the_login_api_is_our_json_502(
    aiohttp_client: Any, head: bytes, client: str
) -> None:
    response = (
        head
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(SUCCESS)
        + SUCCESS
    )
    async with raw_servers() as serve:
        server = await serve(answer_once(response))
        config = capture_config(f"http://127.0.0.1:{server.port}", client=client)
        gateway = await aiohttp_client(build_app(parse_settings(config)))
        reply = await login(gateway)
    # Our check refused it, or the client's parser did first: a 502 either way, never 500.
    assert reply.status == 502
    assert reply.body["error"] == "upstream_unavailable"
    assert not reply.started_a_session()


# -- Generated: refused, or written clean ----------------------------------------------------

# Printable text and a tab, with now and then a control character or a byte that is not
# UTF-8 (a lone surrogate, as both upstream clients decode it).
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.sampled_from(["\t", "\xe9", "\udce9", "\u00a0"]),
        st.characters(max_codepoint=0x1F) | st.just("\x7f"),
    ),
    max_size=12,
)
# Kept whatever their value (too short to hold a token), dropped (hop-by-hop), and one
# kept unless it plants a cookie.
ALWAYS_KEPT = ("X-Note", "Vary")
NAMES = st.sampled_from([*ALWAYS_KEPT, "Keep-Alive", "Set-Cookie"])


@given(
    reason=TEXT,
    headers=st.lists(st.tuples(NAMES, TEXT), max_size=4),
    status=st.sampled_from([200, 401]),
)
async def test_a_reply_is_refused_or_its_head_holds_no_control_character_but_tab(
    reason: str, headers: list[tuple[str, str]], status: int
) -> None:
    capture = new_capture()
    reply = canned_login(reason, headers, status)
    texts = [reason, *(value for _, value in headers)]
    must_refuse = any(
        CONTROL_BUT_TAB.search(text)
        for text in [reason, *(value for name, value in headers if name in ALWAYS_KEPT)]
    )
    response: web.StreamResponse | None = None
    with contextlib.suppress(UpstreamUnavailableError):  # our JSON 502
        response = await capture.relay(reply)
    if response is None:
        assert any(CONTROL_BUT_TAB.search(text) for text in texts)  # for no other reason
        assert reply.released or reply.closed
        assert capture.sessions_created() == 0
        return
    assert not must_refuse
    fields = [response.reason, *(text for field in response.headers.items() for text in field)]
    assert not any(CONTROL_BUT_TAB.search(text) for text in fields)
    assert capture.sessions_created() == (1 if status == 200 else 0)
    head = (await written(response)).partition(b"\r\n\r\n")[0]  # aiohttp refuses nothing
    assert not any(CONTROL_BUT_TAB_BYTES.search(line) for line in head.split(b"\r\n"))
