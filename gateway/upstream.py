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
``UpstreamTimeoutError`` here, at the boundary. Who the principal is, is ``auth``'s job;
WebSockets are ``websocket``'s.

Slow clients hold no upstream connection they can avoid: request bodies up to 64 KiB
(chunked ones too) are read before the upstream is asked, responses up to 64 KiB are read
whole before the client is written to, and a relay whose client reads nothing gives its
connection up when another request needs it (``gateway.http1.pool``). Their timeouts are
``http_server``'s.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
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
_DroppedNames = tuple[frozenset[str], frozenset[str]]  # (as spelled, once '_' is read as '-')
_PEERS_KEPT = 4096  # peer addresses whose trust is remembered (Upstream._is_trusted)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_BUFFER_LIMIT_BYTES = 64 * 1024  # bodies up to this are read whole (cheap, and replayable)


_SURROGATE = "surrogateescape"  # aiohttp decodes header bytes so; encoding back is lossless
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))


def response_has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries content (RFC 9110 §6.4.1)."""
    return method != "HEAD" and status not in NO_BODY_STATUSES


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
        self._public_scheme = public.scheme
        self._public_host = public_host
        self._trusted_networks = tuple(trusted_proxies)
        self._peer_trust: dict[str, bool] = {}
        # By a route's identity headers (an entry per route), from an untrusted and from a
        # trusted peer: see ``_dropped_names``.
        self._untrusted_names: dict[frozenset[str], _DroppedNames] = {}
        self._trusted_names: dict[frozenset[str], _DroppedNames] = {}
        # A DPoP-bound token goes on as received (scheme DPoP and the proof, for an upstream
        # that checks again) or as Bearer with the verified key's thumbprint in a header
        # that is ours on every route (a client's is dropped).
        self._dpop_as_bearer = dpop_upstream == "bearer"
        self._thumbprint_header = thumbprint_header
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
    ) -> CIMultiDict[str]:
        incoming = request.headers
        peer = request.remote or ""
        trusted = bool(self._trusted_networks) and self._is_trusted(peer)
        names = self._trusted_names if trusted else self._untrusted_names
        identity = route.identity_header_names
        known = names.get(identity)
        if known is None:
            known = names[identity] = _dropped_names(identity | self._own_headers, trusted=trusted)
        drop, claimed = known
        if "Connection" in incoming:
            drop = drop | connection_tokens(incoming.getall("Connection"))
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            lname = name.lower()
            if lname in drop or ("_" in lname and lname.replace("_", "-") in claimed):
                continue
            headers.add(name, value)
        cookie = self._forwarded_cookie(incoming)
        if cookie:
            headers["Cookie"] = cookie
        if principal is not None:
            if principal.dpop_jkt is None:
                headers["Authorization"] = f"Bearer {principal.access_token}"
            elif self._dpop_as_bearer:
                headers["Authorization"] = f"Bearer {principal.access_token}"
                headers[self._thumbprint_header] = principal.dpop_jkt
                headers.popall("DPoP", None)
            else:
                headers["Authorization"] = f"DPoP {principal.access_token}"
            for header, claim in route.identity_headers:
                claim_value = principal.claims.get(claim)
                if isinstance(claim_value, str | int | float):
                    text = str(claim_value)
                    # SECURITY: a claim is the IdP's data, not ours; a CR or LF in it would
                    # split the upstream request. Such a value is not forwarded at all.
                    if _CONTROL.isdisjoint(text):
                        headers[header] = text
        elif route.auth == "none" and "Authorization" in incoming:
            headers["Authorization"] = incoming["Authorization"]  # not ours to judge
        if trusted:
            # A proxy of ours: its forwarding headers were kept above; the chain grows by one.
            chain = [v for v in incoming.getall("X-Forwarded-For", ()) if v.strip()]
            headers["X-Forwarded-For"] = ", ".join((*chain, peer))
            headers.setdefault("X-Forwarded-Proto", self._public_scheme)
            headers.setdefault("X-Forwarded-Host", self._public_host)
        else:
            headers["X-Forwarded-For"] = peer
            headers["X-Forwarded-Proto"] = self._public_scheme
            headers["X-Forwarded-Host"] = self._public_host
        ctx = current()
        if ctx is not None:
            headers["X-Request-Id"] = ctx.request_id
            trace = ctx.trace
            if trace is not None:
                # Our span is the upstream's parent; the caller's tracestate goes with its
                # trace only (W3C: none with a traceparent we did not continue).
                headers["traceparent"] = trace.traceparent()
                if trace.tracestate is None:
                    headers.popall("tracestate", None)
                else:
                    headers["tracestate"] = trace.tracestate
        return headers

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

    def _forwarded_cookie(self, incoming: CIMultiDictProxy[str]) -> str | None:
        values = incoming.getall("Cookie", ())
        if not values:
            return None
        prefixes = self._own_prefixes
        if not prefixes:
            return "; ".join(values)
        # SECURITY: our cookies (session, login binding) are credentials for us, never for
        # the upstream.
        kept = [
            part
            for value in values
            for part in map(str.strip, value.split(";"))
            if part and not part.startswith(prefixes)
        ]
        return "; ".join(kept) or None

    async def open(
        self,
        request: web.Request,
        route: Route,
        headers: CIMultiDict[str],
        body: RequestBody,
        path: str,
    ) -> UpstreamReply:
        """Send the request; the caller reads or relays the reply and releases it."""
        tracing = self._tracing
        ctx = current()
        if tracing is None or not tracing.recording or ctx is None:
            return await self._open(request, route, headers, body, path)
        upstream = route.upstream
        with tracing.upstream_span(
            ctx.trace, request.method, upstream.host or "", upstream.port
        ) as (
            span,
            traceparent,
        ):
            if traceparent is not None:
                headers["traceparent"] = traceparent  # the client span is the parent now
            reply = await self._open(request, route, headers, body, path)
            if span is not None:
                span.set_attribute("http.response.status_code", reply.status)
            return reply

    async def _open(
        self,
        request: web.Request,
        route: Route,
        headers: CIMultiDict[str],
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
                    [
                        (k.encode("utf-8", _SURROGATE), v.encode("utf-8", _SURROGATE))
                        for k, v in headers.items()
                    ],
                    body.data,
                    connect_timeout_s=route.connect_timeout_s,
                    read_timeout_s=route.read_timeout_s,
                )
            else:
                reply = await self._open_with_aiohttp(
                    request.method, route, headers, body, path, query
                )
        except GatewayError:
            raise
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except OSError as exc:
            raise UpstreamUnavailableError() from exc
        elapsed = time.perf_counter() - started
        self._metrics.child(self._metrics.upstream_request_duration_seconds, route.name).observe(
            elapsed
        )
        ctx = current()
        if ctx is not None:
            ctx.upstream_s = elapsed
        return reply

    async def _open_with_aiohttp(
        self,
        method: str,
        route: Route,
        headers: CIMultiDict[str],
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
        """Stream the upstream's reply to the client; errors after headers abort."""
        raw = upstream.headers
        drop = _RESPONSE_DROP
        for name, _ in raw:
            if name.lower() == "connection":
                drop = drop | connection_tokens(header_values(raw, "connection"))
                break
        # SECURITY: an upstream must not plant or overwrite our cookies (session fixation,
        # login CSRF): their names are parsed as a browser parses them (``set_cookie``), in
        # the form the browser gets (``as_sent``).
        guard = self._cookie_guard
        headers = []
        for k, v in raw:
            lname = k.lower()
            if lname in drop or (guard and lname == "set-cookie" and guard.plants(as_sent(v))):
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
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=body
            )
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


def _dropped_names(identity: frozenset[str], *, trusted: bool) -> _DroppedNames:
    """Client header names never forwarded on a route: as spelled (lowercase), and as read
    by a server that takes '_' for '-'. Identity headers are ours under either spelling."""
    folded = frozenset(name.replace("_", "-") for name in identity)
    drop = (_TRUSTED_DROP if trusted else _UNTRUSTED_DROP) | identity | folded
    return drop, _CLAIMED | folded


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
