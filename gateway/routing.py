"""The route table: normalise a request path once, then match it by longest prefix.

Normalisation happens here and only here, and the path that is routed is the path that is
forwarded. It refuses (400) what two readers could read two ways: an encoded slash,
backslash, NUL or semicolon (``%2F %5C %00 %3B``, as Spring Security's StrictHttpFirewall
does), a ``%`` that starts no escape, escapes that are not UTF-8 (the overlong ``%c0%ae``
for "."), raw non-ASCII and control characters. It then percent-decodes, merges slashes
and removes dot segments (RFC 3986 §5.2.4).

Path parameters (``/api;jsessionid=1/items``) are matched on the servlet view: servlet
containers (Tomcat, Jetty, Spring) drop each segment's ``;params`` before they normalise,
so a route prefix is matched against the segments' names before their first ``;`` and
``/api;x/items`` gets the ``/api`` route. A segment with no name (``/;x/``) or named ``.``
or ``..`` (``..;``, ``.;x``, ``%2e%2e;x``) is refused: a servlet reads it as an empty or
dot segment our normalisation never saw. The forwarded path keeps the parameters, for
upstreams that use them; ``strip_prefix`` drops the prefix's segments, parameters and all.
Authentication and forwarding are left to ``auth`` and ``upstream``.
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
# An encoded ';' is a literal to a container that strips parameters before decoding and a
# parameter to one that decodes first: refused too (Spring's StrictHttpFirewall).
_FORBIDDEN_ENCODED = re.compile(r"%(2f|5c|00|3b)", re.IGNORECASE)
# RFC 3986 §2.1: "%" followed by two hex digits, nothing else.
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"
# The common path, already canonical: segments of unreserved and sub-delim characters but
# ";" (no "%", no "\\", no parameters), none empty, "." or ".." (a trailing "/" allowed).
# ``parse_path`` and ``encode_path`` return it untouched, the same answer their general
# code gives; a path with parameters takes the general code, so this costs nothing more.
_CANONICAL = re.compile(r"/|(?:/(?!\.\.?(?:/|$))[A-Za-z0-9:@!$&'()*+,=._~-]+)+/?")


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
    # POST and PATCH are replayed after a refresh too (idempotent methods always are).
    replay_non_idempotent: bool = False
    # Bearer tokens: the providers taken (empty: all), DPoP required, JWTs introspected too.
    providers: frozenset[str] = frozenset()
    require_dpop: bool = False
    introspect_jwts: bool = False

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
            replay_non_idempotent=settings.replay_non_idempotent_after_refresh,
            providers=frozenset(settings.providers),
            require_dpop=settings.require_dpop,
            introspect_jwts=settings.introspect_jwts,
        )

    def matches(self, path: str) -> bool:
        """Whether the servlet view ``path`` (no parameters) is under this route's prefix."""
        # Segment-wise: "/api" matches "/api" and "/api/x", never "/apix".
        return (
            self.prefix == "/"
            or path == self.prefix
            or (path.startswith(self.prefix) and path[len(self.prefix)] == "/")
        )

    def upstream_path(self, path: str) -> str:
        """The path to request upstream for the normalised request ``path``."""
        if self.strip_prefix and self.prefix != "/":
            if ";" in path:
                # "/api;x/items" under "/api": drop as many segments as the prefix has.
                depth = self.prefix.count("/")
                parts = path.split("/", depth + 1)
                path = "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"
            else:
                path = path[len(self.prefix) :] or "/"
        # Decoded, like ``path``: the caller encodes the whole once (a base of "/my%20base"
        # must not become "/my%2520base").
        base = self.upstream.path.rstrip("/")
        return base + path


def _plain_origin(upstream: URL) -> tuple[str, int] | None:
    if upstream.scheme != "http" or upstream.host is None:
        return None
    return upstream.host, upstream.port or 80


def parse_path(raw_path: str) -> str:
    """Normalise the raw request path (no query) into its decoded canonical form.

    Raises ``BadRequestError`` for every path it will not route; nothing else.
    """
    if _CANONICAL.fullmatch(raw_path):
        return raw_path  # nothing encoded, no dot segment, no empty segment: as it is
    if not raw_path.startswith("/"):
        raise BadRequestError("the request target must be an absolute path")
    if not raw_path.isascii():
        # aiohttp's C parser refuses raw non-ASCII itself; its pure-Python parser passes it
        # on as surrogate escapes, which have no UTF-8 form to forward.
        raise BadRequestError("the request target must be ASCII; percent-encode the rest")
    if _FORBIDDEN_ENCODED.search(raw_path) or "\\" in raw_path:
        raise BadRequestError(
            "encoded slashes, backslashes, semicolons and NUL are not allowed in paths"
        )
    if _MALFORMED_ESCAPE.search(raw_path):
        raise BadRequestError("a '%' in the path must start a percent-encoded octet")
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        # SECURITY: not UTF-8, e.g. the overlong "%c0%ae" that lenient decoders read as ".".
        raise BadRequestError("percent-encoded octets in the path must be UTF-8") from None
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
        if ";" in segment and segment.partition(";")[0] in ("", ".", ".."):
            # SECURITY: a servlet reads "..;" as "..", "/pub/..;/api" as "/api".
            raise BadRequestError("a path segment needs a name other than '.' or '..' before ';'")
        segments.append(segment)
    trailing = decoded.endswith("/") or decoded.endswith("/.") or decoded.endswith("/..")
    path = "/" + "/".join(segments)
    if trailing and segments:
        path += "/"
    return path


def _servlet_view(path: str) -> str:
    """``path`` as a servlet container routes it: each segment without its ``;params``."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


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
        """The route for the normalised ``path``, chosen by its servlet view."""
        if ";" in path:
            # SECURITY: "/api;x/items" is "/api/items" to a servlet upstream; route it so.
            path = _servlet_view(path)
        if path.startswith("/auth") and (path == "/auth" or path[5] == "/"):
            # SECURITY: /auth/ is ours. A path that only normalises into it
            # ("/public/%2e%2e/auth/login") never falls through to a route's upstream.
            raise NotFoundError()
        exact = self._exact.get(path)
        if exact is not None:
            return exact
        for route in self._routes:
            if route.matches(path):
                return route
        raise NotFoundError()
