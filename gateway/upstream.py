"""Forwarding: one request to the route's upstream and its response back, both streamed.

Strips hop-by-hop headers both ways (RFC 9110 §7.6.1), our session cookie, client-sent
identity headers (under any spelling a server may fold into ours) and, unless the peer is a
trusted proxy, the client's forwarding headers; sets ``Authorization`` from the principal,
``X-Forwarded-For/-Proto/-Host`` and ``X-Request-Id``. Enforces the body limit while
streaming (413).

Plain ``http://`` upstreams go through ``gateway.http1`` (a keep-alive pool on llhttp, about
twice the throughput of aiohttp's client); ``https://`` upstreams, and every upstream when
``upstream.client`` is ``aiohttp``, through the app's ``ClientSession``. Both answer as an
``UpstreamReply``; their errors become ``UpstreamUnavailableError`` /
``UpstreamTimeoutError`` here, at the boundary. Request headers are built as bytes, from
the client's raw header bytes, in the pool's wire form (``UpstreamHeaders``); aiohttp's
client gets them decoded. Who the principal is, is ``auth``'s job; WebSockets are
``websocket``'s.

Slow clients hold no upstream connection they can avoid: request bodies up to 64 KiB
(chunked ones too) are read before the upstream is asked, responses up to 64 KiB are read
whole before the client is written to, and a relay whose client reads nothing gives its
connection up when another request needs it (``gateway.http1.pool``). Their timeouts are
``http_server``'s.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web, web_response
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict
from yarl import URL

from gateway.context import current, set_request_id_header
from gateway.errors import (
    GatewayError,
    PayloadTooLargeError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.http1 import Http1Pool
from gateway.http1.wire import NO_BODY_STATUSES
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.routing import Route
from gateway.set_cookie import CookieGuard
from gateway.tracing import Tracing

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1, plus the de-facto ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never copied from the client: we set them, or the connection does.
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "expect", "x-request-id", "cookie"}
# SECURITY: the headers upstream frameworks take the client's address, scheme, host or URL
# from (Werkzeug's ProxyFix, Rack, Spring, Symfony, Django, Express, IIS's URL rewrite, Go's
# RealIP middlewares, CDNs). Only a trusted proxy (forwarded.trusted_proxies) may send them;
# from any other peer they are removed, and X-Forwarded-For/-Proto/-Host set by us.
FORWARDING_HEADERS = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "x-forwarded-uri",
        "x-original-url",
        "x-rewrite-url",
        "x-original-host",
        "x-host",
        "x-real-ip",
        "x-client-ip",
        "client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "front-end-https",
    }
)
_UNTRUSTED_DROP = _REQUEST_DROP | FORWARDING_HEADERS
_TRUSTED_DROP = _REQUEST_DROP | {"x-forwarded-for"}  # the peer is appended to it
# SECURITY: Werkzeug, Puma before 6.4.3 (CVE-2024-45614), nginx with underscores_in_headers
# and every CGI/WSGI environ (HTTP_X_USER_ID) read "X_User_Id" as "X-User-Id". A client
# header that is one of these once '_' is read as '-' is never forwarded, whoever sent it:
# beside ours it could win. Content-Length is here for framing's sake.
_CLAIMED = _UNTRUSTED_DROP | {"content-length"}
# Dropped client headers whose values build_headers reads: it sets these itself from them.
_READ = frozenset({b"cookie", b"connection", b"authorization", b"x-forwarded-for"})
_PEERS_KEPT = 4096  # peer addresses whose trust is remembered (Upstream._is_trusted)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_BUFFER_LIMIT_BYTES = 64 * 1024  # bodies up to this are read whole (cheap, and replayable)


_SURROGATE = "surrogateescape"  # aiohttp decodes header bytes so; encoding back is lossless
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))
RawHeaders = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class _DroppedNames:
    """Client header names never forwarded on a route, lowercase bytes (``_dropped_names``)."""

    drop: frozenset[bytes]  # as spelled
    drop_traced: frozenset[bytes]  # the same, and the trace context we send instead
    claimed: frozenset[bytes]  # once '_' is read as '-'
    identity: tuple[tuple[bytes, bytes, str], ...]  # (name, lowercase name, claim)


def response_has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries content (RFC 9110 §6.4.1;
    a 2xx to CONNECT is a tunnel, §9.3.6, as aiohttp's ``must_be_empty_body`` has it)."""
    return (
        method != "HEAD"
        and status not in NO_BODY_STATUSES
        and not (method == "CONNECT" and 200 <= status < 300)
    )


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` values: hop-by-hop for this message only."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of header ``name`` (lowercase) in a list of pairs."""
    return [value for key, value in headers if key.lower() == name]


def as_sent(value: str) -> str:
    """A header value as aiohttp's serialiser writes it to the client.

    Both upstream clients decode header bytes that are not UTF-8 as lone surrogates
    (surrogateescape), and aiohttp's serialiser drops every surrogate without a word:
    ``__Host-tokengate\\xe9=x`` reaches the browser as ``__Host-tokengate=x``. SECURITY: a
    filter of the upstream's headers (our cookies, capture's tokens) judges this, what the
    browser gets, never the value as it arrived.
    """
    return value if value.isascii() else value.encode("utf-8", "ignore").decode("utf-8")


class UpstreamReply(Protocol):
    """An upstream's answer with its body still on the wire; ``gateway.http1.Http1Response``
    is one. Errors while reading are ``TimeoutError`` or another ``OSError``: the one
    boundary (``open``, ``relay``) turns them into 504 / 502, and both clients raise
    nothing else (``gateway.http1`` by its error tree, aiohttp's by the translation in
    ``_ClientReply`` and ``_open_with_aiohttp``).

    ``headers`` are ``(name, value)`` pairs in arrival order. ``read`` and a finished
    ``iter_chunks`` release the connection; ``release`` gives it back unread (closing it if
    the exchange did not end cleanly), ``close`` always closes it.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class _ClientReply:
    """An ``aiohttp.ClientResponse`` as an ``UpstreamReply``: its errors become ``OSError``."""

    __slots__ = ("_response", "content_length", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = list(response.headers.items())
        self.content_length = response.content_length

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except aiohttp.ClientError as exc:
            raise ConnectionError(str(exc)) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            raise ConnectionError(str(exc)) from exc
        finally:
            self._response.release()

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class UpstreamHeaders:
    """The headers a request goes upstream with: ``(name, value)`` bytes pairs, in the order
    ``Http1Pool.request`` sends them.

    ``Upstream.build_headers`` makes them from the client's raw header bytes (no
    ``CIMultiDict``, no decoding and encoding again per request); the client's values stay
    as it sent them, ours are UTF-8. ``set`` and ``remove`` are for the few who change them
    afterwards (a replay's new token, capture, the upstream span's traceparent); aiohttp's
    client and WebSockets take ``items()``, the pairs decoded as aiohttp decodes a
    request's headers.
    """

    __slots__ = ("pairs",)

    def __init__(self, pairs: RawHeaders | None = None) -> None:
        self.pairs: RawHeaders = [] if pairs is None else pairs

    def set(self, name: str, value: str) -> None:
        """``name`` (in any case) has this one value from now on, last."""
        self.remove(name)
        self.pairs.append((name.encode("ascii"), value.encode("utf-8", _SURROGATE)))

    def remove(self, name: str) -> None:
        """No ``name`` (in any case) at all."""
        key = name.lower().encode("ascii")
        self.pairs = [pair for pair in self.pairs if pair[0].lower() != key]

    def getall(self, name: str) -> list[str]:
        """Every value of ``name`` (in any case), decoded."""
        key = name.lower().encode("ascii")
        return [v.decode("utf-8", _SURROGATE) for k, v in self.pairs if k.lower() == key]

    def items(self) -> list[tuple[str, str]]:
        """The pairs as ``str``, decoded as aiohttp decodes header bytes: for its client."""
        return [
            (k.decode("utf-8", _SURROGATE), v.decode("utf-8", _SURROGATE)) for k, v in self.pairs
        ]


@dataclass(frozen=True, slots=True)
class RequestBody:
    """A request body: ``None``, bytes already read (replayable), or a one-shot stream."""

    data: bytes | AsyncIterator[bytes] | None

    @property
    def replayable(self) -> bool:
        return not isinstance(self.data, AsyncIterator)


class Upstream:
    """Borrows the app's upstream clients: the HTTP/1.1 pool and the ``ClientSession``.

    ``pool`` is ``None`` when every upstream goes through aiohttp (``upstream.client``).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        pool: Http1Pool | None,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        public_url: str,
        trusted_proxies: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        own_cookies: frozenset[str] = frozenset(),
        dpop_upstream: Literal["as_received", "bearer"] = "as_received",
        thumbprint_header: str = "X-DPoP-Thumbprint",
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing
        self._http = http
        self._pool = pool
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._own_prefixes = tuple(f"{name}=" for name in own_cookies)
        self._cookie_guard = CookieGuard(own_cookies)
        # What users see, whatever Host a client sent or the scheme the load balancer used.
        public = URL(public_url)
        public_host = public.host_port_subcomponent  # default port omitted, IDN as punycode
        if not public.scheme or public_host is None:
            raise ValueError("public_url must be an absolute URL")
        self._public_scheme = public.scheme.encode("ascii")
        self._public_host = public_host.encode("ascii")
        self._trusted_networks = tuple(trusted_proxies)
        self._peer_trust: dict[str, bool] = {}
        # By a route's identity headers (an entry per route), from an untrusted and from a
        # trusted peer: see ``_dropped_names``.
        self._untrusted_names: dict[tuple[tuple[str, str], ...], _DroppedNames] = {}
        self._trusted_names: dict[tuple[tuple[str, str], ...], _DroppedNames] = {}
        # A DPoP-bound token goes on as received (scheme DPoP and the proof, for an upstream
        # that checks again) or as Bearer with the verified key's thumbprint in a header
        # that is ours on every route (a client's is dropped).
        self._dpop_as_bearer = dpop_upstream == "bearer"
        self._thumbprint_header = thumbprint_header.encode("utf-8")
        self._own_headers = frozenset({thumbprint_header.lower()})

    @property
    def http(self) -> aiohttp.ClientSession:
        return self._http

    async def read_body(self, request: web.Request, route: Route) -> RequestBody:
        if not request.body_exists:
            return RequestBody(None)
        limit = self._max_body_bytes if route.max_body_bytes is None else route.max_body_bytes
        length = request.content_length
        content = request.content
        if length is not None:
            if length > limit:
                raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
            if length <= _BUFFER_LIMIT_BYTES:
                return RequestBody(await content.readexactly(length))
            return RequestBody(_stream_limited(content, limit))
        # Chunked: its first 64 KiB are read before the upstream is asked, as a body with a
        # length is. One that ends within them goes whole, so a client trickling a small
        # upload holds no upstream connection meanwhile (nginx buffers every body).
        parts: list[bytes] = []
        received = 0
        while received <= _BUFFER_LIMIT_BYTES:
            chunk = await content.readany()
            if not chunk:
                return RequestBody(b"".join(parts))
            received += len(chunk)
            if received > limit:
                raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
            parts.append(chunk)
        return RequestBody(_stream_limited(content, limit, b"".join(parts)))

    def build_headers(
        self, request: web.Request, route: Route, principal: Principal | None
    ) -> UpstreamHeaders:
        """The request's headers for the upstream, from its raw header bytes: the client's
        less what is hop-by-hop, ours or (from an untrusted peer) forwarding, then ours."""
        peer = request.remote or ""
        trusted = bool(self._trusted_networks) and self._is_trusted(peer)
        names = self._trusted_names if trusted else self._untrusted_names
        known = names.get(route.identity_headers)
        if known is None:
            known = names[route.identity_headers] = _dropped_names(
                route.identity_headers, self._own_headers, trusted=trusted
            )
        ctx = current()
        trace = None if ctx is None else ctx.trace
        # With a trace of ours, the caller's traceparent and tracestate are replaced below.
        drop = known.drop if trace is None else known.drop_traced
        claimed = known.claimed
        pairs: RawHeaders = []
        read: dict[bytes, list[bytes]] | None = None  # dropped, but their values count
        for pair in request.raw_headers:
            lname = pair[0].lower()
            if lname in drop:
                if lname in _READ:
                    if read is None:
                        read = {}
                    read.setdefault(lname, []).append(pair[1])
                continue
            if b"_" in lname and lname.replace(b"_", b"-") in claimed:
                continue
            pairs.append(pair)
        if read is None:
            read = {}
        if connection := read.get(b"connection"):
            # Hop-by-hop for this message only, by the client's word (RFC 9110 §7.6.1).
            listed = _listed_names(tuple(connection)) - drop
            if listed:
                pairs = [pair for pair in pairs if pair[0].lower() not in listed]
        if cookies := read.get(b"cookie"):
            cookie = self._forwarded_cookie(cookies)
            if cookie:
                pairs.append((b"Cookie", cookie))
        if principal is not None:
            token = principal.access_token.encode("utf-8", _SURROGATE)
            if principal.dpop_jkt is None:
                pairs.append((b"Authorization", b"Bearer " + token))
            elif self._dpop_as_bearer:
                pairs = [pair for pair in pairs if pair[0].lower() != b"dpop"]
                pairs.append((b"Authorization", b"Bearer " + token))
                pairs.append((self._thumbprint_header, principal.dpop_jkt.encode("utf-8")))
            else:
                pairs.append((b"Authorization", b"DPoP " + token))
            if known.identity:
                pairs += _identity_pairs(known.identity, principal)
        elif route.auth == "none" and (authorization := read.get(b"authorization")):
            pairs.append((b"Authorization", authorization[0]))  # not ours to judge
        if trusted:
            # A proxy of ours: its forwarding headers were kept above; the chain grows by one.
            chain = [v for v in _decoded(read.get(b"x-forwarded-for", ())) if v.strip()]
            chain.append(peer)
            pairs.append((b"X-Forwarded-For", ", ".join(chain).encode("utf-8", _SURROGATE)))
            sent = {pair[0].lower() for pair in pairs}
            if b"x-forwarded-proto" not in sent:
                pairs.append((b"X-Forwarded-Proto", self._public_scheme))
            if b"x-forwarded-host" not in sent:
                pairs.append((b"X-Forwarded-Host", self._public_host))
        else:
            pairs.append((b"X-Forwarded-For", peer.encode("utf-8", _SURROGATE)))
            pairs.append((b"X-Forwarded-Proto", self._public_scheme))
            pairs.append((b"X-Forwarded-Host", self._public_host))
        if ctx is not None:
            pairs.append((b"X-Request-Id", ctx.request_id.encode("utf-8", _SURROGATE)))
            if trace is not None:
                # Our span is the upstream's parent; the caller's tracestate goes with its
                # trace only (W3C: none with a traceparent we did not continue).
                pairs.append((b"traceparent", trace.traceparent().encode("ascii")))
                if trace.tracestate is not None:
                    pairs.append((b"tracestate", trace.tracestate.encode("utf-8", _SURROGATE)))
        return UpstreamHeaders(pairs)

    def _is_trusted(self, peer: str) -> bool:
        # Parsing an address costs more than the rest of build_headers; most requests come
        # from a few peers (the load balancer's), so answers are kept, up to a bound.
        known = self._peer_trust
        trusted = known.get(peer)
        if trusted is None:
            if len(known) >= _PEERS_KEPT:
                known.clear()
            trusted = known[peer] = _in_networks(peer, self._trusted_networks)
        return trusted

    def _forwarded_cookie(self, values: list[bytes]) -> bytes | None:
        prefixes = self._own_prefixes
        if not prefixes:
            return b"; ".join(values)
        # SECURITY: our cookies (session, login binding) are credentials for us, never for
        # the upstream. Judged on the text aiohttp would have decoded, by the same rule.
        kept = [
            part
            for value in _decoded(values)
            for part in map(str.strip, value.split(";"))
            if part and not part.startswith(prefixes)
        ]
        return "; ".join(kept).encode("utf-8", _SURROGATE) or None

    def open(
        self,
        request: web.Request,
        route: Route,
        headers: UpstreamHeaders,
        body: RequestBody,
        path: str,
    ) -> Awaitable[UpstreamReply]:
        """Send the request; the caller reads or relays the reply and releases it. (Not a
        coroutine itself: untraced, it hands over ``_open``'s, one frame fewer.)"""
        tracing = self._tracing
        if tracing is None or not tracing.recording:
            return self._open(request, route, headers, body, path)
        return self._open_traced(tracing, request, route, headers, body, path)

    async def _open_traced(
        self,
        tracing: Tracing,
        request: web.Request,
        route: Route,
        headers: UpstreamHeaders,
        body: RequestBody,
        path: str,
    ) -> UpstreamReply:
        ctx = current()
        if ctx is None:
            return await self._open(request, route, headers, body, path)
        upstream = route.upstream
        with tracing.upstream_span(
            ctx.trace, request.method, upstream.host or "", upstream.port
        ) as (
            span,
            traceparent,
        ):
            if traceparent is not None:
                headers.set("traceparent", traceparent)  # the client span is the parent now
            reply = await self._open(request, route, headers, body, path)
            if span is not None:
                span.set_attribute("http.response.status_code", reply.status)
            return reply

    async def _open(
        self,
        request: web.Request,
        route: Route,
        headers: UpstreamHeaders,
        body: RequestBody,
        path: str,
    ) -> UpstreamReply:
        query = request.raw_path.partition("?")[2]  # as sent, never re-encoded
        started = time.perf_counter()
        try:
            if self._pool is not None and route.origin is not None:
                target = f"{path}?{query}" if query else path
                reply: UpstreamReply = await self._pool.request(
                    request.method,
                    route.origin[0],
                    route.origin[1],
                    target.encode("utf-8", _SURROGATE),
                    headers.pairs,
                    body.data,
                    connect_timeout_s=route.connect_timeout_s,
                    read_timeout_s=route.read_timeout_s,
                )
            else:
                reply = await self._open_with_aiohttp(
                    request.method, route, headers.items(), body, path, query
                )
        except GatewayError:
            raise
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except OSError as exc:
            raise UpstreamUnavailableError() from exc
        elapsed = time.perf_counter() - started
        self._metrics.observe(self._metrics.upstream_request_duration_seconds, route.name, elapsed)
        ctx = current()
        if ctx is not None:
            ctx.upstream_s = elapsed
        return reply

    async def _open_with_aiohttp(
        self,
        method: str,
        route: Route,
        headers: list[tuple[str, str]],
        body: RequestBody,
        path: str,
        query: str,
    ) -> UpstreamReply:
        url = URL.build(
            scheme=route.upstream.scheme,
            authority=route.upstream.raw_authority,
            path=path,
            query_string=query,
            encoded=True,
        )
        try:
            response = await self._http.request(
                method,
                url,
                headers=headers,
                data=body.data,
                allow_redirects=False,
                timeout=route.timeout,
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, GatewayError):  # the body's own, e.g. 413
                raise exc.__cause__ from None
            if isinstance(exc, TimeoutError):
                raise
            raise ConnectionError(str(exc)) from exc
        except (ValueError, RuntimeError) as exc:
            # aiohttp's own checks (a header value it will not send, a session closed at
            # shutdown): the request cannot reach the upstream, which is a 502, not a 500.
            log.warning("upstream_request_refused", extra={"error_type": type(exc).__name__})
            raise ConnectionError(type(exc).__name__) from exc
        if response.status < 200:
            # A protocol switch we did not ask for (WebSockets go through ``websocket``):
            # relaying it would hand the client a connection neither side can frame.
            response.close()
            raise ConnectionError("the upstream switched protocols")
        return _ClientReply(response)

    async def relay(self, request: web.Request, upstream: UpstreamReply) -> web.StreamResponse:
        """Relay the upstream's reply to the client: a body of known length up to 64 KiB
        read whole and answered as a ``BufferedResponse``, anything else streamed (errors
        after the head abort the client's connection)."""
        raw = upstream.headers
        drop = _RESPONSE_DROP
        for name, _ in raw:
            if name.lower() == "connection":
                drop = _response_drop(tuple(header_values(raw, "connection")))
                break
        # SECURITY: an upstream must not plant or overwrite our cookies (session fixation,
        # login CSRF): their names are parsed as a browser parses them (``set_cookie``), in
        # the form the browser gets (``as_sent``).
        guard = self._cookie_guard
        headers = []
        for k, v in raw:
            lname = k.lower()
            if lname in drop or (lname == "set-cookie" and guard and guard.plants(as_sent(v))):
                continue
            headers.append((k, v))
        length = upstream.content_length
        no_body = not response_has_body(request.method, upstream.status)
        if not no_body and length is not None and length <= _BUFFER_LIMIT_BYTES:
            try:
                body = await upstream.read()
            except TimeoutError as exc:
                raise UpstreamTimeoutError() from exc
            except OSError as exc:
                raise UpstreamUnavailableError() from exc
            try:
                return BufferedResponse(request, upstream.status, upstream.reason, headers, body)
            except ValueError as exc:
                raise refused_head(exc) from exc
        refuse_head(upstream, upstream.reason, *(text for field in headers for text in field))
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        if length is not None:
            response.content_length = length
        set_request_id_header(response)
        try:
            await response.prepare(request)
            if no_body:
                upstream.release()
            else:
                async for chunk in upstream.iter_chunks():
                    await response.write(chunk)
            await response.write_eof()
        except (OSError, GatewayError) as exc:
            upstream.close()
            transport = request.transport
            if transport is None or transport.is_closing():
                # The client is gone, or timed out (``http_server`` says which): the rest of
                # the body goes with its upstream connection, and there is no one to tell.
                return response
            # Headers are gone: the only honest signal left is a broken connection.
            log.warning("upstream_stream_aborted", extra={"error_type": type(exc).__name__})
            transport.abort()
        except BaseException:
            upstream.close()  # the client went away (cancelled): the rest is unread
            raise
        return response


class BufferedResponse(web.StreamResponse):
    """A relayed reply read whole (up to 64 KiB), written with its head in one write.

    aiohttp's ``web.Response`` costs more here than all of our own work on a request: a
    ``CIMultiDict`` of the upstream's headers, ``prepare``, ``_prepare_headers``,
    ``_serialize_headers`` and the ``write_eof`` chain (about 30 µs). Here the head is text
    built once from the kept upstream headers and written with the body in one
    ``writer.write_eof``, with what aiohttp's ``StreamResponse._prepare_headers`` would
    add, decided as it decides it: ``Content-Length``; ``Content-Type:
    application/octet-stream`` for a body without one; ``Date`` and ``Server`` (the
    module global ``http_server.hide_server_banner`` rebinds) unless the upstream sent
    them; ``X-Request-Id`` (ours replaces the upstream's); ``Connection: close`` or
    ``keep-alive`` from ``keep_alive`` and the version. Lone surrogates (header bytes
    that are not UTF-8) are dropped, as aiohttp's serialiser drops them (``as_sent``).

    It is a ``StreamResponse`` so that aiohttp's ``finish_response`` (``prepare``,
    ``write_eof``, then ``keep_alive``) and ``ingress`` (``prepared``, ``status``,
    ``headers``) treat it as any other; ``on_response_prepare`` runs as for any response.
    A header set on ``headers`` before ``prepare`` replaces the upstream's of that name,
    except the framing ones (Content-Length, Transfer-Encoding, Connection), which are ours.

    SECURITY: the reason phrase and the header fields are the upstream's; a CR, LF or other
    control character in them would split the response (llhttp refuses them in fields but
    not in the reason, aiohttp's client lets some through in values). Each is checked when
    the head is built: ``ValueError``.
    """

    def __init__(
        self,
        request: web.BaseRequest,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        if not response_has_body(request.method, status):
            raise RuntimeError("a response without content is relayed streamed")  # a bug
        super().__init__(status=status, reason=reason)  # ValueError for a CR or LF in reason
        refuse_controls(self._reason)
        ctx = current()
        self._request_id = None if ctx is None else ctx.request_id
        self._fields = headers
        self._data = body
        self._head = b""
        version = request.version
        self._status_line = f"HTTP/{version.major}.{version.minor} {status} {self._reason}\r\n"
        # Framing is ours whatever relay let through; so is the request id when we have one.
        skip = _FRAMING if self._request_id is None else _FRAMING_AND_ID
        self._head_text, self._has_date = _head_lines(self._status_line, headers, len(body), skip)

    @property
    def body(self) -> bytes:
        return self._data

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        self._req = request
        self._must_be_empty_body = False  # by construction: relay sends HEAD etc. streamed
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        writer = self._payload_writer = request.writer
        if self._cookies:
            for cookie in self._cookies.values():
                self._headers.add("Set-Cookie", cookie.output(header="")[1:])
        await request._prepare_hook(self)
        self._head = self._finish_head(request.version, keep_alive)
        return writer

    def _finish_head(self, version: HttpVersion, keep_alive: bool) -> bytes:
        text, has_date, request_id = self._head_text, self._has_date, self._request_id
        extra = self._headers
        if extra and not (
            len(extra) == 1 and request_id is not None and extra.get("X-Request-Id") == request_id
        ):
            # More than ingress's request id, the one we have: the fields set replace the
            # upstream's, and are checked as the upstream's are.
            text, has_date, request_id = self._merged_head(extra)
        lines = [text]
        if request_id is not None:
            lines.append(f"X-Request-Id: {request_id}\r\n")
        if not has_date:
            lines.append(f"Date: {rfc822_formatted_time()}\r\n")
        if keep_alive:
            if version == HttpVersion10:
                lines.append("Connection: keep-alive\r\n")
        elif version == HttpVersion11:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "ignore")

    def _merged_head(self, extra: CIMultiDict[str]) -> tuple[str, bool, str | None]:
        """The head's first lines when ``headers`` holds more than ingress's request id:
        its fields replace the upstream's of the same names (framing excepted)."""
        replaced = {name.lower() for name in extra}
        fields = [(k, v) for k, v in self._fields if k.lower() not in replaced]
        fields += extra.items()
        request_id = None if "X-Request-Id" in extra else self._request_id
        skip = _FRAMING if request_id is None else _FRAMING_AND_ID
        text, has_date = _head_lines(self._status_line, fields, len(self._data), skip)
        return text, has_date, request_id

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a buffered response is written whole by write_eof")

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        if writer is None:
            raise RuntimeError("Response has not been started")
        if data:
            raise RuntimeError("a buffered response has its body already")
        # One write: head and body in one segment, counted in writer.output_size (the
        # watchdog of http_server reads it), drained as aiohttp drains.
        await writer.write_eof(self._head + self.body)
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None


_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_FRAMING_AND_ID = _FRAMING | {"x-request-id"}
_DEFAULTED = frozenset({"date", "server", "content-type"})  # aiohttp adds them if absent
# What refuse_controls refuses: every control character but HTAB, as aiohttp's
# serialiser does (RFC 9110 §5.5).
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _head_lines(
    status_line: str, fields: list[tuple[str, str]], body_length: int, skip: frozenset[str]
) -> tuple[str, bool]:
    """The status line, ``fields`` but those named in ``skip``, Content-Length, and
    Content-Type and Server where aiohttp adds them, each with its CRLF; and whether
    ``fields`` hold a Date. ``ValueError`` for a control character in a field
    (``refuse_controls``)."""
    lines = [status_line]
    has_date = has_server = has_type = False
    for name, value in fields:
        lname = name.lower()
        if lname in skip:
            continue
        if not (name.isprintable() and value.isprintable()):
            refuse_controls(name, value)
        if lname in _DEFAULTED:
            if lname == "date":
                has_date = True
            elif lname == "server":
                has_server = True
            else:
                has_type = True
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {body_length}\r\n")
    if body_length and not has_type:
        lines.append("Content-Type: application/octet-stream\r\n")
    if not has_server:
        lines.append(f"Server: {web_response.SERVER_SOFTWARE}\r\n")  # type: ignore[attr-defined]
    return "".join(lines), has_date


def refused_head(exc: ValueError) -> UpstreamUnavailableError:
    """A head we will not write (``refuse_controls``): llhttp lets control characters
    through in the reason phrase, aiohttp's client in field values too. Before a byte is
    sent it is still a clean 502, not aiohttp's serialiser refusing it later (a 500)."""
    log.warning("upstream_head_refused", extra={"error_type": type(exc).__name__})
    return UpstreamUnavailableError()


def refuse_head(upstream: UpstreamReply, *texts: str) -> None:
    """Refuse ``upstream``'s reply, before a byte of it is written, when one of ``texts``
    (its reason phrase, the fields we would write) holds a control character but HTAB
    (``refuse_controls``): the reply is closed (the unread rest of its body goes with its
    connection; after a read it is a no-op) and ``refused_head``'s 502 raised."""
    try:
        refuse_controls(*texts)
    except ValueError as exc:
        upstream.close()
        raise refused_head(exc) from exc


def refuse_controls(*texts: str) -> None:
    """SECURITY: a name, value or reason phrase with a CR, LF or other control character
    but HTAB would start a line of its own in the head (response splitting), or be refused
    by the client: ``ValueError``. ``isprintable`` (C speed) passes almost every text; only
    one that is not (a tab, a byte that is not UTF-8, a space beyond ASCII) is searched."""
    for text in texts:
        if not text.isprintable() and _CONTROL_BUT_TAB.search(text) is not None:
            raise ValueError("a header field or the reason phrase contains a control character")


def _in_networks(
    peer: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False  # a Unix socket: no address to trust
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return any(address in network for network in networks)


def _dropped_names(
    identity_headers: tuple[tuple[str, str], ...], own: frozenset[str], *, trusted: bool
) -> _DroppedNames:
    """Client header names never forwarded on a route: as spelled (lowercase), and as read
    by a server that takes '_' for '-'. Identity headers (and ``own``, ours on every route)
    are ours under either spelling. Computed once per route and trust, as bytes."""
    identity = frozenset(name.lower() for name, _ in identity_headers) | own
    folded = frozenset(name.replace("_", "-") for name in identity)
    drop = _encoded((_TRUSTED_DROP if trusted else _UNTRUSTED_DROP) | identity | folded)
    return _DroppedNames(
        drop=drop,
        drop_traced=drop | {b"traceparent", b"tracestate"},
        claimed=_encoded(_CLAIMED | folded),
        identity=tuple(
            (name.encode("utf-8"), name.lower().encode("utf-8"), claim)
            for name, claim in identity_headers
        ),
    )


def _identity_pairs(
    identity: tuple[tuple[bytes, bytes, str], ...], principal: Principal
) -> RawHeaders:
    """A route's identity headers from the principal's claims; the last of one name wins."""
    found: dict[bytes, tuple[bytes, bytes]] = {}
    for name, lname, claim in identity:
        claim_value = principal.claims.get(claim)
        if isinstance(claim_value, str | int | float):
            text = str(claim_value)
            # SECURITY: a claim is the IdP's data, not ours; a CR or LF in it would split
            # the upstream request, and a lone surrogate (JSON's "\ud800") is dropped by
            # aiohttp's serialiser, which could make one name another's. Such a value is
            # not forwarded at all.
            if _CONTROL.isdisjoint(text):
                try:
                    found[lname] = (name, text.encode("utf-8"))
                except UnicodeEncodeError:
                    continue
    return list(found.values())


@functools.lru_cache(maxsize=256)
def _listed_names(values: tuple[bytes, ...]) -> frozenset[bytes]:
    """The names a request's ``Connection`` values list, by ``connection_tokens``' rule.
    Remembered: browsers send the same one or two (``keep-alive``) on every request."""
    return _encoded(connection_tokens(_decoded(values)))


@functools.lru_cache(maxsize=256)
def _response_drop(connection: tuple[str, ...]) -> frozenset[str]:
    """An upstream's header names never relayed, with these ``Connection`` values: most
    upstreams send the same one (``keep-alive``) on every response, so it is remembered."""
    return _RESPONSE_DROP | connection_tokens(connection)


def _encoded(names: frozenset[str]) -> frozenset[bytes]:
    return frozenset(name.encode("utf-8", _SURROGATE) for name in names)


def _decoded(values: Iterable[bytes]) -> list[str]:
    """Header values as aiohttp decodes them: what the rules over ``str`` were written for."""
    return [value.decode("utf-8", _SURROGATE) for value in values]


async def _stream_limited(
    content: aiohttp.StreamReader, limit: int, read: bytes = b""
) -> AsyncIterator[bytes]:
    """The body as it arrives, after the part already ``read``; 413 past ``limit``. A client
    that stalls meets ``http_server``'s body timeout."""
    received = len(read)
    if read:
        yield read
    async for chunk in content.iter_any():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
        yield chunk
