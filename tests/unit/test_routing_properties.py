"""Generated paths: refused only with a 400, and routed as a servlet upstream will read them."""

from __future__ import annotations

from urllib.parse import unquote

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.errors import BadRequestError, NotFoundError
from gateway.routing import RouteTable, encode_path, parse_path
from gateway.settings import RouteSettings

# Pieces of segments: names, dot segments, parameters, escapes good and bad (encoded dots,
# semicolons, slashes, the overlong %c0%ae, a surrogate, a cut sequence), non-ASCII,
# control characters, and what aiohttp's pure-Python parser hands over for a raw 0xff.
_ODD_PIECES = (
    *(".", "..", ";", "%", "%2e", "%2E", "%3b", "%3B", "%2f", "%5c", "%00", "%c0%ae"),
    *("%ed%a0%80", "%e2%82", "%25", "%252e", "%41", "%4", "%zz"),
    *("é", "\u0000", "\x1f", "\x7f", " ", "\\", "#", "\udcff"),
)
_NAMES = ("api", "admin", "pub", "public", "items", "x", "=", "~")
# Pieces a servlet gives meaning to but that we accept: most generated paths should parse.
_PLAUSIBLE_PIECES = (*_NAMES, ".", "..", ";", ";x", ";jsessionid=1", "%2e", "%41", "%25", "%c3%a9")
_percent_encoded_bytes = st.binary(min_size=1, max_size=4).map(
    lambda raw: "".join(f"%{byte:02x}" for byte in raw)
)
_hostile_piece = st.one_of(
    st.sampled_from(_PLAUSIBLE_PIECES),
    st.sampled_from(_ODD_PIECES),
    _percent_encoded_bytes,
    st.text(max_size=3),
)


def _paths(segment: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda lead, segments, trail: lead + "/".join(segments) + trail,
        st.sampled_from(["/", "//", "/./", ""]),
        st.lists(segment, max_size=6),
        st.sampled_from(["", "/"]),
    )


# A name or dot segment and its parameters; any two plausible pieces; up to three of any.
_named_segment = st.builds(
    str.__add__,
    st.sampled_from((*_NAMES, ".", "..", "%2e", "%2e%2e", "")),
    st.sampled_from(("", ";", ";x", ";jsessionid=1", ";a=1;b")),
)
raw_paths = st.one_of(
    _paths(_named_segment),
    _paths(st.lists(st.sampled_from(_PLAUSIBLE_PIECES), max_size=2).map("".join)),
    _paths(st.lists(_hostile_piece, max_size=3).map("".join)),
)

_PREFIXES = ("/api", "/api/admin", "/pub", "/public", "/public/x")


def table(*prefixes: str, base: str = "", strip: bool = False) -> RouteTable:
    return RouteTable.build(
        tuple(
            RouteSettings(
                prefix=p, upstream=f"http://127.0.0.1:1{base}", auth="none", strip_prefix=strip
            )
            for p in prefixes
        )
    )


_ROUTES = table(*_PREFIXES)  # no "/" route: "no route" is an answer too
_STRIPPED = table(*_PREFIXES, base="/base", strip=True)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, its steps A to E in order."""
    source, output = path, ""
    while source:
        if source.startswith(("../", "./")):  # A
            source = source.partition("/")[2]
        elif source.startswith("/./") or source == "/.":  # B
            source = "/" + source[3:]
        elif source.startswith("/../") or source == "/..":  # C
            source = "/" + source[4:]
            output = output[: output.rfind("/")] if "/" in output else ""
        elif source in (".", ".."):  # D
            source = ""
        else:  # E
            end = source.find("/", 1)
            end = len(source) if end == -1 else end
            output, source = output + source[:end], source[end:]
    return output


def strip_parameters(path: str) -> str:
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def servlet_reading(forwarded: str) -> str:
    """What Tomcat or Jetty route on: parameters dropped, then decoded, then normalised."""
    return remove_dot_segments(unquote(strip_parameters(forwarded), errors="strict"))


def decoding_first_reading(forwarded: str) -> str:
    """A container that decodes before it drops parameters: the reason %3B is refused."""
    return remove_dot_segments(strip_parameters(unquote(forwarded, errors="strict")))


def route_for(routes: RouteTable, path: str) -> str | None:
    """The prefix of the route ``path`` goes to, or ``None`` for none."""
    try:
        return routes.match(path).prefix
    except NotFoundError:
        return None


@given(raw_paths)
@example("/open/%c0%ae%c0%ae/api/items")
@example("/pub/..;/api/items")
@example("/pub/%2e%2e;x/api/echo")
def test_a_path_is_refused_only_with_bad_request(raw: str) -> None:
    try:
        path = parse_path(raw)
    except BadRequestError:
        return
    for routes in (_ROUTES, _STRIPPED):
        try:
            route = routes.match(path)
        except NotFoundError:
            continue
        assert encode_path(route.upstream_path(path)).isascii()


@given(raw_paths)
@example("/api;jsessionid=1/items")
@example("/pub;x/../api;y/admin")
def test_what_is_routed_is_what_a_servlet_upstream_reads(raw: str) -> None:
    try:
        path = parse_path(raw)
    except BadRequestError:
        return
    forwarded = encode_path(path)  # the route's upstream has no base path and no strip
    for reading in (servlet_reading(forwarded), decoding_first_reading(forwarded)):
        assert reading == strip_parameters(path)
        assert route_for(_ROUTES, reading) == route_for(_ROUTES, path)


@given(raw_paths)
@example("/api;a/admin;b/x;c")
@example("/api;a")
def test_strip_prefix_forwards_exactly_what_follows_the_prefix(raw: str) -> None:
    try:
        path = parse_path(raw)
    except BadRequestError:
        return
    try:
        route = _STRIPPED.match(path)
    except NotFoundError:
        return
    forwarded = encode_path(route.upstream_path(path))
    rest = strip_parameters(path)[len(route.prefix) :] or "/"
    assert servlet_reading(forwarded) == "/base" + rest


@given(raw_paths)
@example("/a/%2525/b;%2541")
def test_parse_path_is_idempotent_on_what_it_forwards(raw: str) -> None:
    try:
        path = parse_path(raw)
    except BadRequestError:
        return
    assert parse_path(encode_path(path)) == path
