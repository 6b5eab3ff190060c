"""Reading our cookie from the Cookie header, and the cookie value -> handle memo."""

from __future__ import annotations

import secrets

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.sessions.cookie import SessionCookies, cookie_value, encode_secret
from gateway.sessions.crypto import derive_handle
from gateway.settings import SessionSettings


def request(*cookie_headers: str) -> object:
    headers = CIMultiDict(("Cookie", value) for value in cookie_headers)
    return make_mocked_request("GET", "/", headers=headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (("a=1; tg=v1; b=2",), "v1"),
        (("tg=v1",), "v1"),
        (("a=1;tg=v1",), "v1"),
        (("a=1", "tg=v2"), "v2"),  # HTTP/2 may split Cookie into several fields
        (("tg=first; tg=second",), "first"),  # the most specific path comes first
        (("xtg=no; tg2=no",), None),  # a name that merely starts or ends alike
        (("tg",), None),
        (("tg=",), ""),
        ((), None),
    ],
)
def test_cookie_value(headers: tuple[str, ...], expected: str | None) -> None:
    assert cookie_value(request(*headers), "tg") == expected  # type: ignore[arg-type]


def test_session_handle_is_derived_once_per_secret_and_stays_bounded() -> None:
    cookies = SessionCookies(SessionSettings(cookie_name="tg", local_cache_size=2))
    secrets_ = [secrets.token_bytes(32) for _ in range(3)]
    handles = [
        cookies.session_handle(request(f"tg={encode_secret(s)}"))  # type: ignore[arg-type]
        for s in secrets_
    ]
    assert handles == [derive_handle(s) for s in secrets_]
    assert list(cookies._handles) == [encode_secret(s) for s in secrets_[1:]]  # oldest went
    assert cookies.session_handle(request("tg=not-a-secret")) is None  # type: ignore[arg-type]
    assert "not-a-secret" not in cookies._handles  # what we never issued is not remembered
