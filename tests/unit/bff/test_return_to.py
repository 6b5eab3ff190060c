"""return_to: a path on our own origin, never an open redirect."""

from __future__ import annotations

import pytest

from gateway.bff.return_to import DEFAULT, parse_return_to


@pytest.mark.parametrize("value", ["/", "/app", "/app/page?x=1#frag", "/a%20b", "/caf%C3%A9"])
def test_same_origin_paths_are_kept(value: str) -> None:
    assert parse_return_to(value) == value


@pytest.mark.parametrize("value", [None, ""])
def test_absent_is_the_default(value: str | None) -> None:
    assert parse_return_to(value) == DEFAULT


@pytest.mark.parametrize(
    "value",
    [
        "//evil.com",
        "https://evil.com",
        "http:evil.com",
        "javascript:alert(1)",
        "evil.com",
        "/\\evil.com",
        "\\\\evil.com",
        "/%2F%2Fevil.com",
        "%2F%2Fevil.com",
        "/%5Cevil.com",
        "/%252F%252Fevil.com",
        "/%0d%0aSet-Cookie:x",
        "/\t/evil.com",
        "/" + "a" * 3000,
    ],
)
def test_anything_else_is_refused(value: str) -> None:
    assert parse_return_to(value) is None
