"""Forwarding: one request to the route's upstream and its response back, both streamed.

Strips hop-by-hop headers both ways (RFC 9110 §7.6.1), our session cookie and any
client-sent identity headers; sets ``Authorization`` from the principal, ``X-Forwarded-*``
and ``X-Request-Id``. Enforces the body limit while streaming (413). Translates aiohttp's
client errors into ``UpstreamUnavailableError`` / ``UpstreamTimeoutError`` here, at the
boundary. Who the principal is, is ``auth``'s job; WebSockets are ``websocket``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.context import current
from gateway.errors import (
    GatewayError,
    PayloadTooLargeError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.routing import Route

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
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_BUFFER_LIMIT_BYTES = 64 * 1024  # bodies up to this are read whole (cheap, and replayable)
_NO_BODY_STATUSES = frozenset({204, 304})


def connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in ``Connection``: hop-by-hop for this message only."""
    values = headers.getall("Connection", ())
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


@dataclass(frozen=True, slots=True)
class RequestBody:
    """A request body: ``None``, bytes already read (replayable), or a one-shot stream."""

    data: bytes | AsyncIterator[bytes] | None

    @property
    def replayable(self) -> bool:
        return not isinstance(self.data, AsyncIterator)


class Upstream:
    """Owns nothing but borrows the app's pooled ``ClientSession`` for upstream calls."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        own_cookies: frozenset[str] = frozenset(),
    ) -> None:
        self._http = http
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._own_cookies = own_cookies
        self._own_prefixes = tuple(f"{name}=" for name in own_cookies)

    @property
    def http(self) -> aiohttp.ClientSession:
        return self._http

    async def read_body(self, request: web.Request, route: Route) -> RequestBody:
        if not request.body_exists:
            return RequestBody(None)
        limit = self._max_body_bytes if route.max_body_bytes is None else route.max_body_bytes
        length = request.content_length
        if length is not None:
            if length > limit:
                raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
            if length <= _BUFFER_LIMIT_BYTES:
                return RequestBody(await request.content.readexactly(length))
        return RequestBody(_stream_limited(request.content, limit))

    def build_headers(
        self, request: web.Request, route: Route, principal: Principal | None
    ) -> CIMultiDict[str]:
        incoming = request.headers
        drop = (
            _REQUEST_DROP | connection_tokens(incoming)
            if "Connection" in incoming
            else (_REQUEST_DROP)
        )
        identity = route.identity_header_names  # built once per route, not per request
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            lname = name.lower()
            if lname not in drop and lname not in identity:
                headers.add(name, value)
        cookie = self._forwarded_cookie(incoming)
        if cookie:
            headers["Cookie"] = cookie
        if principal is not None:
            headers["Authorization"] = f"Bearer {principal.access_token}"
            for header, claim in route.identity_headers:
                claim_value = principal.claims.get(claim)
                if isinstance(claim_value, str | int | float):
                    headers[header] = str(claim_value)
        elif route.auth == "none" and "Authorization" in incoming:
            headers["Authorization"] = incoming["Authorization"]  # not ours to judge
        peer = request.remote or ""
        previous = incoming.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        ctx = current()
        if ctx is not None:
            headers["X-Request-Id"] = ctx.request_id
        return headers

    def _forwarded_cookie(self, incoming: CIMultiDictProxy[str]) -> str | None:
        values = incoming.getall("Cookie", ())
        if not values:
            return None
        if not self._own_cookies:
            return "; ".join(values)
        # SECURITY: our cookies (session, login binding) are credentials for us, never for
        # the upstream.
        kept = [
            part.strip()
            for value in values
            for part in value.split(";")
            if part.strip() and not part.strip().startswith(self._own_prefixes)
        ]
        return "; ".join(kept) or None

    async def open(
        self,
        request: web.Request,
        route: Route,
        headers: CIMultiDict[str],
        body: RequestBody,
        path: str,
    ) -> aiohttp.ClientResponse:
        """Send the request; the caller reads or relays the response and releases it."""
        url = URL.build(
            scheme=route.upstream.scheme,
            authority=route.upstream.raw_authority,
            path=path,
            query_string=request.raw_path.partition("?")[2],  # as sent, never re-encoded
            encoded=True,
        )
        started = time.perf_counter()
        try:
            response = await self._http.request(
                request.method,
                url,
                headers=headers,
                data=body.data,
                allow_redirects=False,
                timeout=route.timeout,
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except GatewayError:
            raise
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, PayloadTooLargeError):
                raise exc.__cause__ from None
            raise UpstreamUnavailableError() from exc
        elapsed = time.perf_counter() - started
        self._metrics.child(self._metrics.upstream_request_duration_seconds, route.name).observe(
            elapsed
        )
        ctx = current()
        if ctx is not None:
            ctx.upstream_s = elapsed
        return response

    async def relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the upstream's response to the client; errors after headers abort."""
        drop = _RESPONSE_DROP
        if "Connection" in upstream.headers:
            drop = drop | connection_tokens(upstream.headers)
        headers = CIMultiDict(
            (k, v)
            for k, v in upstream.headers.items()
            if k.lower() not in drop and not self._sets_own_cookie(k, v)
        )
        length = upstream.content_length
        no_body = request.method == "HEAD" or upstream.status in _NO_BODY_STATUSES
        try:
            if not no_body and length is not None and length <= _BUFFER_LIMIT_BYTES:
                body = await upstream.read()
                return web.Response(
                    status=upstream.status, reason=upstream.reason, headers=headers, body=body
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError() from exc
        finally:
            if not no_body and length is not None and length <= _BUFFER_LIMIT_BYTES:
                upstream.release()
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers)
        if length is not None:
            response.content_length = length
        try:
            await response.prepare(request)
            if not no_body:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # Headers are gone: the only honest signal left is a broken connection.
            log.warning("upstream_stream_aborted", extra={"error_type": type(exc).__name__})
            if request.transport is not None:
                request.transport.abort()
        finally:
            upstream.release()
        return response

    def _sets_own_cookie(self, name: str, value: str) -> bool:
        # SECURITY: an upstream must not plant or overwrite our cookies (session fixation).
        return (
            bool(self._own_cookies)
            and name.lower() == "set-cookie"
            and value.lstrip().startswith(self._own_prefixes)
        )


async def _stream_limited(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in content.iter_any():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
        yield chunk
