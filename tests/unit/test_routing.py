"""Path normalisation and longest-prefix routing."""

from __future__ import annotations

import random
import re

import pytest

from gateway.errors import BadRequestError, NotFoundError
from gateway.routing import RouteTable, encode_path, parse_path
from gateway.settings import RouteSettings


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/", "/"),
        ("/api/x", "/api/x"),
        ("/api//x", "/api/x"),
        ("/api/./x/", "/api/x/"),
        ("/public/../api/x", "/api/x"),
        ("/public/%2e%2e/api/x", "/api/x"),
        ("/public/%2E%2E/%2e/api", "/api"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/api/caf%C3%A9", "/api/café"),
        ("/api/a%20b", "/api/a b"),
    ],
)
def test_parse_path_normalises(raw: str, normalised: str) -> None:
    assert parse_path(raw) == normalised


@pytest.mark.parametrize(
    "raw", ["/api%2F..%2Fadmin", "/api%2fx", "/api/%5c..", "/api\\..\\x", "/a%00b", "x", "/a%0ab"]
)
def test_parse_path_refuses_ambiguous_paths(raw: str) -> None:
    with pytest.raises(BadRequestError):
        parse_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/open/%c0%ae%c0%ae/api/items",  # overlong UTF-8 for "..": a UnicodeDecodeError once
        "/a/%ff",
        "/a/%ed%a0%80",  # an encoded UTF-16 surrogate
        "/a/%e2%82",  # a truncated sequence
        "/a/%zz",
        "/a/%",
        "/a/%4",
        "/caf\u00e9",  # raw non-ASCII, as aiohttp's pure-Python parser passes it on
        "/a\udcff/b",  # a raw byte 0xff from that parser: once a UnicodeEncodeError
        "http://x/y",
        "*",
    ],
)
def test_parse_path_refuses_undecodable_paths_with_bad_request(raw: str) -> None:
    with pytest.raises(BadRequestError):
        parse_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/pub/..;/api/items",
        "/pub/%2e%2e;x/api/echo",
        "/pub/%2E;/api",
        "/pub/.;x/api",
        "/pub/;x/api",
        "/;x",
        "/pub/..;jsessionid=1/api",
        "/pub/%3b/api",
        "/pub/a%3Bb",
    ],
)
def test_path_parameters_that_could_climb_or_hide_are_refused(raw: str) -> None:
    with pytest.raises(BadRequestError):
        parse_path(raw)


def test_path_parameters_are_kept_and_routed_by_the_segment_name() -> None:
    routes = table("/", "/api", "/api/admin")
    path = parse_path("/api;jsessionid=1/items")
    assert path == "/api;jsessionid=1/items"
    assert routes.match(path).prefix == "/api"
    assert routes.match(parse_path("/api;x")).prefix == "/api"
    assert routes.match(parse_path("/api;x/admin;y/users")).prefix == "/api/admin"
    assert routes.match(parse_path("/a;x/../api;y/.")).prefix == "/api"
    assert routes.match(parse_path("/apix;y")).prefix == "/"
    assert encode_path(path) == "/api;jsessionid=1/items"


def test_strip_prefix_drops_the_prefix_segments_with_their_parameters() -> None:
    route = table("/api/admin", strip=True).match("/api;a/admin;b/x;c/y")
    assert route.upstream_path("/api;a/admin;b/x;c/y") == "/base/x;c/y"
    assert route.upstream_path("/api;a/admin;b") == "/base/"
    assert route.upstream_path("/api;a/admin;b/") == "/base/"
    assert route.upstream_path("/api/admin;b/x") == "/base/x"


def test_encode_path_round_trips_reserved_characters() -> None:
    assert encode_path("/api/a b/café") == "/api/a%20b/caf%C3%A9"
    assert encode_path("/api/a?b#c") == "/api/a%3Fb%23c"


def table(*prefixes: str, strip: bool = False) -> RouteTable:
    return RouteTable.build(
        tuple(
            RouteSettings(
                prefix=p, upstream="http://127.0.0.1:1/base", auth="none", strip_prefix=strip
            )
            for p in prefixes
        )
    )


def test_longest_prefix_wins_on_segment_boundaries() -> None:
    routes = table("/", "/api", "/api/admin")
    assert routes.match("/api/admin/users").prefix == "/api/admin"
    assert routes.match("/api/administrators").prefix == "/api"
    assert routes.match("/api").prefix == "/api"
    assert routes.match("/apix").prefix == "/"


def test_no_route_is_not_found() -> None:
    with pytest.raises(NotFoundError):
        table("/api").match("/other")


@pytest.mark.parametrize("path", ["/auth", "/auth/login", "/auth/callback", "/auth;x/login"])
def test_a_path_that_normalises_into_auth_never_reaches_a_route(path: str) -> None:
    # "/public/%2e%2e/auth/login" is "/auth/login" once normalised: ours, not the / route's.
    with pytest.raises(NotFoundError):
        table("/", "/public").match(path)
    assert table("/", "/public").match("/authors").prefix == "/"


def test_an_encoded_upstream_base_is_encoded_once() -> None:
    route = RouteTable.build(
        (RouteSettings(prefix="/api", upstream="http://127.0.0.1:1/my%20base", auth="none"),)
    ).match("/api/x")
    assert encode_path(route.upstream_path("/api/a b")) == "/my%20base/api/a%20b"


def test_a_route_prefix_with_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="plain path"):
        RouteSettings(prefix="/api;v=1", upstream="http://127.0.0.1:1", auth="none")


def test_upstream_path_joins_base_and_strips_prefix() -> None:
    assert table("/api").match("/api/x").upstream_path("/api/x") == "/base/api/x"
    stripped = table("/api", strip=True).match("/api/x")
    assert stripped.upstream_path("/api/x") == "/base/x"
    assert stripped.upstream_path("/api") == "/base/"


def test_the_canonical_fast_path_answers_as_the_general_code_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A path the fast path returns untouched is one the general code leaves unchanged."""
    from gateway import routing

    rng = random.Random(5)
    pieces = [*"abZ09/._~-:@!$&'()*+,;=", "%2e", "%41", "..", "/.", "//", "/../", "é"]
    paths = ["/", "/a", "/a/", "/.", "/..", "/a/.", "/a/..", "/.a", "/..a", "/a..", "//"]
    paths += [
        "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) for _ in range(5000)
    ]
    fast = [p for p in paths if routing._CANONICAL.fullmatch(p)]
    assert len(fast) > 500  # the sample exercises the fast path
    monkeypatch.setattr(routing, "_CANONICAL", re.compile(r"(?!)"))  # general code only
    for path in fast:
        assert (routing.parse_path(path), routing.encode_path(path)) == (path, path)
