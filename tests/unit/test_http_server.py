"""The server under both apps, on real sockets, built by ``build_runners`` as ``serve`` builds
it: heads aiohttp's parser refuses are answered in our JSON shape without echoing a byte,
logged in one WARNING line and counted; no response names Python's or aiohttp's version.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from aiohttp import http, web, web_response
from hypothesis import given
from hypothesis import strategies as st

from gateway.admin import Readiness
from gateway.metrics import Metrics
from gateway.server import build_runners
from gateway.settings import Settings, parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.raw_http import RawServer, raw_servers, respond_forever

# What the upstream answers to everything: no Server header of its own.
UPSTREAM_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# A credential-shaped value (a JWS) sent in the heads below; no answer may carry it back.
TOKEN = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWFsaWNl"
REFUSED_HEAD_STATUSES = {400, 404, 405, 414, 431}


@dataclass
class Reply:
    """The first response on a connection; one pipelined after it is left out."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    head_done: bool = False
    complete: bool = False
    parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if not self.head_done:
            self.status = self.parser.get_status_code()
            self.head_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


# A request still unanswered after this waits for bytes it declared and never got: the
# client then half-closes, as one that gave up.
_ANSWER_WAIT_S = 0.5


def exchange(port: int, raw: bytes) -> Reply | None:
    """Send ``raw`` on a new connection and read one response (blocking: Hypothesis runs in
    a thread beside the server's loop); None when the server closed without a word."""
    reply = Reply()
    parser = reply.parser = httptools.HttpResponseParser(reply)
    received = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close first: read what it said
            sock.sendall(raw)
        sock.settimeout(_ANSWER_WAIT_S)
        while not reply.complete:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(10)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received = True
            parser.feed_data(chunk)
    return reply if received else None


async def send(port: int, raw: bytes) -> Reply:
    reply = await asyncio.to_thread(exchange, port, raw)
    assert reply is not None
    assert reply.complete
    return reply


@dataclass
class Served:
    port: int
    admin_port: int
    metrics: Metrics


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Served]:
    metrics = Metrics()
    runner, admin_runner = build_runners(settings, metrics, Readiness())
    await runner.setup()
    try:
        await admin_runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        await web.TCPSite(admin_runner, "127.0.0.1", 0).start()
        yield Served(runner.addresses[0][1], admin_runner.addresses[0][1], metrics)
    finally:
        await runner.cleanup()
        await admin_runner.cleanup()


@pytest.fixture
def aiohttp_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's Server banner as imported, so that the servers of this test, not an earlier
    test's, are what hide it."""
    monkeypatch.setattr(web_response, "SERVER_SOFTWARE", http.SERVER_SOFTWARE)


@pytest.fixture
async def upstream() -> AsyncIterator[RawServer]:
    async with raw_servers() as start:
        yield await start(respond_forever(UPSTREAM_REPLY))


@pytest.fixture
async def served(aiohttp_banner: None, upstream: RawServer) -> AsyncIterator[Served]:
    config = {
        "public_url": "http://localhost:8080",
        "limits": {"shutdown_delay_s": 0},
        "routes": [
            {"prefix": "/public", "upstream": f"http://127.0.0.1:{upstream.port}", "auth": "none"}
        ],
    }
    async with serving(parse_settings(config)) as served:
        yield served


def head(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def assert_refused_as_ours(reply: Reply, status: int, error: str) -> None:
    assert reply.status == status
    assert reply.header("content-type") == "application/json; charset=utf-8"
    assert reply.header("cache-control") == "no-store"
    assert reply.header("connection") == "close"
    assert reply.header("server") == "tokengate"
    assert reply.json()["error"] == error


def parse_errors(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "tokengate_http_parse_errors_total", {"reason": reason}
    )


def problems_in_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno >= logging.ERROR
        or record.exc_info is not None
        or "Error handling request" in record.getMessage()
        or record.getMessage() == "unhandled_error"
    ]


async def test_a_100_kb_header_is_a_431_that_echoes_nothing_logged_once_and_counted(
    served: Served, upstream: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    value = b"Bearer " + TOKEN * (100_000 // len(TOKEN))
    raw = head(b"GET /public/x HTTP/1.1", b"Host: a", b"X-Auth: " + value)
    reply = await send(served.port, raw)
    assert_refused_as_ours(reply, 431, "request_header_fields_too_large")
    assert b"eyJ" not in reply.body
    assert b"X-Auth" not in reply.body
    assert b"Bearer" not in reply.body
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage(), r.__dict__["reason"], r.__dict__["status"]) for r in warnings] == [
        ("bad_request_head", "header_too_large", 431)
    ]
    assert warnings[0].exc_info is None
    assert "eyJ" not in str(warnings[0].__dict__)
    assert problems_in_log(caplog) == []
    assert parse_errors(served.metrics, "header_too_large") == 1
    requests = served.metrics.registry.get_sample_value(
        "tokengate_http_requests_total", {"route": "-", "method": "other", "code": "431"}
    )
    assert requests == 1
    assert upstream.requests == []


@pytest.mark.parametrize("target_bytes", [17_000, 100_000])
async def test_a_request_target_over_max_header_bytes_is_414(
    served: Served, upstream: RawServer, caplog: pytest.LogCaptureFixture, target_bytes: int
) -> None:
    target = b"/public/" + b"a" * target_bytes
    reply = await send(served.port, head(b"GET " + target + b" HTTP/1.1", b"Host: a"))
    assert_refused_as_ours(reply, 414, "uri_too_long")
    assert b"aaaa" not in reply.body
    assert parse_errors(served.metrics, "uri_too_long") == 1
    assert problems_in_log(caplog) == []
    assert upstream.requests == []


@pytest.mark.parametrize("count", [150, 300])  # past ours (the ingress), past the parser's
async def test_too_many_header_fields_is_431(
    served: Served, upstream: RawServer, caplog: pytest.LogCaptureFixture, count: int
) -> None:
    fields = [b"X-Field-%d: v" % i for i in range(count)]
    reply = await send(served.port, head(b"GET /public/x HTTP/1.1", b"Host: a", *fields))
    assert reply.status == 431
    assert reply.json()["error"] == "request_header_fields_too_large"
    assert problems_in_log(caplog) == []
    assert upstream.requests == []


MALFORMED = {
    "garbage request line": b"\x00\x01garbage " + TOKEN + b"\r\n\r\n",
    "TLS on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + TOKEN,
    "extra words after the version": head(b"GET /public/x HTTP/1.1 " + TOKEN, b"Host: a"),
    "invalid method": head(b"G(T /public/x HTTP/1.1", b"Host: a", b"X-T: " + TOKEN),
    "invalid header name": head(b"GET /public/x HTTP/1.1", b"Host: a", b"X(" + TOKEN + b": v"),
    "NUL in a header value": head(b"GET /public/x HTTP/1.1", b"Host: a", b"X-T: " + TOKEN + b"\0"),
    "non-ASCII header name": head(b"GET /public/x HTTP/1.1", b"Host: a", b"X-\xc3\xa9: " + TOKEN),
    "conflicting Content-Length": head(
        b"POST /public/x HTTP/1.1", b"Host: a", b"Content-Length: 1", b"Content-Length: 2"
    )
    + b"ab",
    "Content-Length with chunked": head(
        b"POST /public/x HTTP/1.1",
        b"Host: a",
        b"Content-Length: 3",
        b"Transfer-Encoding: chunked",
    )
    + b"0\r\n\r\n",
    "bad chunk framing": head(
        b"POST /public/x HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked", b"X-T: " + TOKEN
    )
    + b"zz\r\n"
    + TOKEN
    + b"\r\n0\r\n\r\n",
    "bare LF line ends": b"GET /public/x HTTP/1.1\nHost: a\nX-T: " + TOKEN + b"\n\n",
    "obsolete line folding": head(b"GET /public/x HTTP/1.1", b"Host: a", b"X-T: a", b" " + TOKEN),
    "bad version": head(b"GET /public/x HTTP/1.x", b"Host: a", b"X-T: " + TOKEN),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_head_is_400_json_echoing_nothing(
    served: Served, upstream: RawServer, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    reply = await send(served.port, raw)
    assert_refused_as_ours(reply, 400, "invalid_request")
    assert reply.json()["error_description"] == "the request is malformed"
    assert b"eyJ" not in reply.body
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage(), r.__dict__["reason"]) for r in warnings] == [
        ("bad_request_head", "bad_request")
    ]
    assert problems_in_log(caplog) == []
    assert parse_errors(served.metrics, "bad_request") == 1
    assert upstream.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        head(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443"),
        head(b"OPTIONS * HTTP/1.1", b"Host: localhost"),
    ],
    ids=["connect", "asterisk"],
)
async def test_a_target_with_no_path_is_answered_as_ours(
    served: Served, upstream: RawServer, raw: bytes
) -> None:
    reply = await send(served.port, raw)
    assert reply.status in (400, 404)
    assert reply.header("content-type") == "application/json; charset=utf-8"
    assert reply.json()["error"] in ("invalid_request", "not_found")
    assert upstream.requests == []


async def test_the_public_server_answers_without_aiohttp_s_router(
    issuer: FakeIssuer, upstream: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` calls the public app's one handler directly (``app.ENTRY``): the router's
    work is skipped, and what it did (the session endpoints, their methods, ``/auth/`` as
    ours, ``Expect``) is still done, by ``app.PublicRoutes`` and the ingress."""
    resolved: list[str] = []
    resolve = web.UrlDispatcher.resolve

    async def counted(self: web.UrlDispatcher, request: web.Request) -> Any:
        resolved.append(request.path)
        return await resolve(self, request)

    monkeypatch.setattr(web.UrlDispatcher, "resolve", counted)
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    config = base_config(issuer.url, upstream_url)
    config["oidc"]["client_id"] = "spa"
    config["session"] = {"store": "memory"}  # base_config's /public: auth none
    config["routes"].append({"prefix": "/app", "upstream": upstream_url, "auth": "session"})
    async with serving(parse_settings(config)) as served:
        session = {"authenticated": False}
        cases: list[tuple[bytes, int, Any]] = [
            (head(b"GET /public/x HTTP/1.1", b"Host: a"), 200, b"ok"),
            (head(b"GET /auth/session HTTP/1.1", b"Host: a"), 200, session),
            (head(b"POST /auth/login HTTP/1.1", b"Host: a"), 405, "method_not_allowed"),
            (head(b"DELETE /auth/session HTTP/1.1", b"Host: a"), 405, "method_not_allowed"),
            (head(b"GET /auth/callback/x HTTP/1.1", b"Host: a"), 404, "not_found"),
            # the same endpoint, as the proxy reads a path: one reading of a target
            (head(b"GET /public/%2e%2e/auth/session HTTP/1.1", b"Host: a"), 200, session),
            (head(b"GET /public/x HTTP/1.1", b"Host: a", b"Expect: nonsense"), 417, None),
            # a tunnel is never forwarded: ours, before any upstream is asked
            (head(b"CONNECT /public/x HTTP/1.1", b"Host: a"), 405, "method_not_allowed"),
        ]
        for raw, status, expected in cases:
            reply = await send(served.port, raw)
            assert reply.status == status, raw
            if isinstance(expected, bytes):
                assert reply.body == expected
            elif isinstance(expected, str):
                assert reply.json()["error"] == expected
            elif expected is not None:
                assert {k: reply.json()[k] for k in expected} == expected
        continued = await send(
            served.port,
            head(
                b"POST /public/x HTTP/1.1",
                b"Host: a",
                b"Expect: 100-continue",
                b"Content-Length: 2",
            )
            + b"hi",
        )
        assert continued.status == 100  # answered at once, before the body
        assert "CONNECT" not in {r.method for r in upstream.requests}
    # (the fake issuer is an aiohttp app too: its paths are resolved by its router)
    assert [path for path in resolved if path.startswith(("/public", "/auth"))] == []


async def test_request_bodies_reach_the_upstream_as_sent_never_decoded(
    served: Served, upstream: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    for body in (gzip.compress(b"hello " * 100), b"not gzip at all"):
        raw = head(
            b"POST /public/x HTTP/1.1",
            b"Host: a",
            b"Content-Encoding: gzip",
            b"Content-Length: %d" % len(body),
        )
        reply = await send(served.port, raw + body)
        assert reply.status == 200
        assert upstream.requests[-1].body == body
        assert upstream.requests[-1].header("content-encoding") == "gzip"
    assert problems_in_log(caplog) == []


def assert_no_banner(reply: Reply) -> None:
    assert reply.header("server") in (None, "tokengate"), reply.headers


async def test_no_response_names_python_or_aiohttp(served: Served, upstream: RawServer) -> None:
    relayed = await send(served.port, head(b"GET /public/x HTTP/1.1", b"Host: a"))
    assert (relayed.status, relayed.body) == (200, b"ok")  # the upstream sent no Server
    not_found = await send(served.port, head(b"GET /elsewhere HTTP/1.1", b"Host: a"))
    assert not_found.status == 404
    refused = await send(served.port, b"NOT HTTP\r\n\r\n")
    assert refused.status == 400
    metrics = await send(served.admin_port, head(b"GET /metrics HTTP/1.1", b"Host: a"))
    assert metrics.status == 200
    health = await send(served.admin_port, head(b"GET /healthz HTTP/1.1", b"Host: a"))
    assert health.status == 200
    admin_refused = await send(served.admin_port, head(b"GET /healthz HTTP/1.1", b"X(: v"))
    assert admin_refused.status == 400
    assert admin_refused.json()["error"] == "invalid_request"
    for reply in (relayed, not_found, refused, metrics, health, admin_refused):
        assert_no_banner(reply)


async def test_the_auth_endpoints_name_no_python_or_aiohttp(
    aiohttp_banner: None, issuer: FakeIssuer, upstream: RawServer
) -> None:
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    config = base_config(issuer.url, upstream_url)
    config["oidc"]["client_id"] = "spa"
    config["session"] = {"store": "memory"}
    config["routes"].append({"prefix": "/app", "upstream": upstream_url, "auth": "session"})
    async with serving(parse_settings(config)) as served:
        for path in (b"/auth/session", b"/auth/login", b"/auth/nothing-here"):
            reply = await send(served.port, head(b"GET " + path + b" HTTP/1.1", b"Host: a"))
            assert reply.status < 500
            assert_no_banner(reply)


# -- generated heads ---------------------------------------------------------------------

_VALID_HEAD = (b"GET /public/x HTTP/1.1", b"Host: localhost", b"Authorization: Bearer " + TOKEN)
# After every generated head: the end of a head, and of a chunked body, so that no request
# waits for more (a second request made of these bytes is answered on its own, unread).
_TAIL = b"\r\n\r\n0\r\n\r\n"

Lines = list[bytes]
Mutation = Callable[[st.DrawFn, Lines], Lines]


def _long_target(draw: st.DrawFn, lines: Lines) -> Lines:
    size = draw(st.sampled_from([15_000, 16_400, 17_000, 33_000, 100_000]))
    return [b"GET /public/" + b"a" * size + b" HTTP/1.1", *lines[1:]]


def _long_field(draw: st.DrawFn, lines: Lines) -> Lines:
    size = draw(st.sampled_from([16_000, 17_000, 33_000, 100_000]))
    return [*lines, b"X-Big: " + TOKEN * (size // len(TOKEN))]


def _many_fields(draw: st.DrawFn, lines: Lines) -> Lines:
    count = draw(st.sampled_from([99, 150, 201, 1000]))
    return [*lines, *(b"X-F-%d: v" % i for i in range(count))]


def _bad_version(draw: st.DrawFn, lines: Lines) -> Lines:
    version = draw(
        st.sampled_from(
            [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1", b"HTTP/11", b"http/1.1", b""]
        )
    )
    method, target, _ = lines[0].split(b" ", 2)
    return [b" ".join((method, target, version)), *lines[1:]]


def _bad_method(draw: st.DrawFn, lines: Lines) -> Lines:
    method = draw(
        st.sampled_from(
            [b"G ET", b"GET\x00", b"", b"\x16\x03\x01", b"G\xc3\x89T", b"get", b"BREW", b"PRI"]
        )
    )
    _, rest = lines[0].split(b" ", 1)
    return [method + b" " + rest, *lines[1:]]


def _framing(draw: st.DrawFn, lines: Lines) -> Lines:
    fields = draw(
        st.sampled_from(
            [
                [b"Content-Length: 1", b"Content-Length: 2"],
                [b"Content-Length: 1, 2"],
                [b"Content-Length: 2", b"Transfer-Encoding: chunked"],
                [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                [b"Transfer-Encoding: gzip, chunked"],
                [b"Transfer-Encoding: chunked, gzip"],
                [b"Transfer-Encoding: chunked"],
                [b"Content-Length: -1"],
                [b"Content-Length: +1"],
                [b"Content-Length: 1e1"],
                [b"Content-Length: 4"],
            ]
        )
    )
    return [lines[0].replace(b"GET ", b"POST ", 1), *lines[1:], *fields]


def _odd_field(draw: st.DrawFn, lines: Lines) -> Lines:
    odd = draw(
        st.sampled_from(
            [
                b"X-A: a\x00b",
                b"X\x7fA: v",
                b"X A: v",
                b"X-\xc3\x89: v",
                b"X-A: \xff\xfe",
                b": no-name",
                b"X-A",
                b" folded",
                b"\tfolded",
                b"X-A : v",
                b"X-A:\x0bv",
                b"Host: another",
            ]
        )
    )
    index = draw(st.integers(1, len(lines)))
    return [*lines[:index], odd, *lines[index:]]


def _line_ends(draw: st.DrawFn, lines: Lines) -> Lines:
    # Line ends are added by the caller; a line may carry a stray one of its own.
    index = draw(st.integers(0, len(lines) - 1))
    end = draw(st.sampled_from([b"\n", b"\r", b"\r\r", b"\n\r", b" \r\n", b"\r\n"]))
    return [*lines[:index], lines[index] + end, *lines[index + 1 :]]


def _random_bytes(draw: st.DrawFn, lines: Lines) -> Lines:
    index = draw(st.integers(0, len(lines) - 1))
    line = lines[index]
    at = draw(st.integers(0, len(line)))
    junk = draw(st.binary(min_size=1, max_size=12))
    return [*lines[:index], line[:at] + junk + line[at:], *lines[index + 1 :]]


def _no_host(draw: st.DrawFn, lines: Lines) -> Lines:
    return [line for line in lines if not line.startswith(b"Host:")]


_MUTATIONS: list[Mutation] = [
    _long_target,
    _long_field,
    _many_fields,
    _bad_version,
    _bad_method,
    _framing,
    _odd_field,
    _line_ends,
    _random_bytes,
    _no_host,
]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    lines = list(_VALID_HEAD)
    for mutation in draw(st.lists(st.sampled_from(_MUTATIONS), max_size=3)):
        lines = mutation(draw, lines)
    return b"\r\n".join(lines) + _TAIL


HEADS = st.one_of(
    mutated_heads(),
    st.binary(min_size=1, max_size=256).map(lambda junk: junk + _TAIL),
)


def check_reply(raw: bytes, reply: Reply) -> None:
    assert reply.status < 500, (raw[:200], reply.status, reply.body[:300])
    assert_no_banner(reply)
    assert b"eyJ" not in reply.body  # the token's first bytes, or any other JWS
    if reply.status < 400:
        assert reply.body == b"ok"  # the upstream's answer, relayed
        return
    assert reply.status in REFUSED_HEAD_STATUSES, (raw[:200], reply.status, reply.body[:300])
    assert reply.header("content-type") == "application/json; charset=utf-8"
    document = reply.json()
    assert set(document) == {"error", "error_description"}
    assert isinstance(document["error_description"], str)


async def test_no_generated_head_gets_a_5xx_a_traceback_or_its_own_bytes_back(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    unanswered: list[bytes] = []

    @given(HEADS)
    def property_holds(raw: bytes) -> None:
        reply = exchange(served.port, raw)
        if reply is None:
            unanswered.append(raw)
            return
        check_reply(raw, reply)
        assert problems_in_log(caplog) == []

    # Hypothesis runs its examples in a thread with blocking sockets; this loop serves them.
    await asyncio.to_thread(property_holds)
    await asyncio.sleep(0)  # anything logged after the last answer is in the records now
    assert problems_in_log(caplog) == []
    assert unanswered == []
