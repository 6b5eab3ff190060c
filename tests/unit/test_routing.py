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
