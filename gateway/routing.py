"""The route table: normalise a request path once, then match it by longest prefix.

Normalisation (RFC 3986 §5.2.4 dot-segment removal, merged slashes, percent-decoding of
everything but an encoded slash or backslash, which are refused) happens here and only
here; the path that is routed is the path that is forwarded. Authentication and
forwarding are left to ``auth`` and ``upstream``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from aiohttp import ClientTimeout
from yarl import URL

from gateway.errors import BadRequestError, NotFoundError
from gateway.settings import AuthMode, CaptureSettings, RouteSettings

# SECURITY: an encoded '/' or '\' would let "/api%2F..%2Fadmin" mean one path to us and
# another to the upstream; refuse them rather than guess (Envoy's REJECT_REQUEST default).
_FORBIDDEN_ENCODED = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"
# The common path, already canonical: segments of unreserved and sub-delim characters (no
# "%", no "\\"), none empty, "." or ".." (a trailing "/" allowed). ``parse_path`` and
# ``encode_path`` return it untouched, the same answer their general code gives.
_CANONICAL = re.compile(r"/|(?:/(?!\.\.?(?:/|$))[A-Za-z0-9:@!$&'()*+,;=._~-]+)+/?")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    upstream: URL
    auth: AuthMode
    scopes: frozenset[str]
    strip_prefix: bool
    timeout: ClientTimeout  # for aiohttp's client (https, WebSockets)
    connect_timeout_s: float
    read_timeout_s: float
    origin: tuple[str, int] | None  # (host, port) of a plain-http upstream, else None
    websocket: bool
    identity_headers: tuple[tuple[str, str], ...]
    identity_header_names: frozenset[str]  # lowercased: stripped from every client request
    max_body_bytes: int | None
    capture: CaptureSettings | None = field(default=None, compare=False)  # a login API

    @classmethod
    def from_settings(cls, settings: RouteSettings) -> Route:
        assert settings.name is not None
        upstream = URL(settings.upstream)
        return cls(
            name=settings.name,
            prefix=settings.prefix,
            upstream=upstream,
            auth=settings.auth,
            scopes=frozenset(settings.scopes),
            strip_prefix=settings.strip_prefix,
            # No total: a 1 GiB download may take minutes; the upstream may only go silent.
            timeout=ClientTimeout(
                total=None,
                sock_connect=settings.connect_timeout_s,
                sock_read=settings.read_timeout_s,
            ),
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            origin=_plain_origin(upstream),
            websocket=settings.websocket,
            identity_headers=tuple(settings.identity_headers.items()),
            identity_header_names=frozenset(h.lower() for h in settings.identity_headers),
            max_body_bytes=settings.max_body_bytes,
            capture=settings.capture_tokens,
        )

    def matches(self, path: str) -> bool:
        # Segment-wise: "/api" matches "/api" and "/api/x", never "/apix".
        return (
            self.prefix == "/"
            or path == self.prefix
            or (path.startswith(self.prefix) and path[len(self.prefix)] == "/")
        )

    def upstream_path(self, path: str) -> str:
        """The path to request upstream for the normalised request ``path``."""
        if self.strip_prefix and self.prefix != "/":
            path = path[len(self.prefix) :] or "/"
        base = self.upstream.raw_path.rstrip("/")
        return base + path


def _plain_origin(upstream: URL) -> tuple[str, int] | None:
    if upstream.scheme != "http" or upstream.host is None:
        return None
    return upstream.host, upstream.port or 80


def parse_path(raw_path: str) -> str:
    """Normalise the raw request path (no query) into its decoded canonical form."""
    if _CANONICAL.fullmatch(raw_path):
        return raw_path  # nothing encoded, no dot segment, no empty segment: as it is
    if not raw_path.startswith("/"):
        raise BadRequestError("the request target must be an absolute path")
    if _FORBIDDEN_ENCODED.search(raw_path) or "\\" in raw_path:
        raise BadRequestError("encoded slashes, backslashes and NUL are not allowed in paths")
    decoded = unquote(raw_path, errors="strict")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise BadRequestError("control characters are not allowed in paths")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = decoded.endswith("/") or decoded.endswith("/.") or decoded.endswith("/..")
    path = "/" + "/".join(segments)
    if trailing and segments:
        path += "/"
    return path


def encode_path(path: str) -> str:
    if _CANONICAL.fullmatch(path):
        return path  # only characters quote() keeps as they are
    return quote(path, safe=_SAFE_PATH_CHARS)


class RouteTable:
    """Routes ordered by prefix length; ``match`` returns the longest that fits."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))
        self._exact: dict[str, Route] = {r.prefix: r for r in self._routes}

    @classmethod
    def build(cls, settings: tuple[RouteSettings, ...]) -> RouteTable:
        return cls(tuple(Route.from_settings(s) for s in settings))

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def match(self, path: str) -> Route:
        exact = self._exact.get(path)
        if exact is not None:
            return exact
        for route in self._routes:
            if route.matches(path):
                return route
        raise NotFoundError()
