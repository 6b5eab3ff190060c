"""The session cookie and the login-binding cookie: their values and their attributes.

A cookie value is 32 random bytes, base64url: 256 bits from which ``sessions.crypto``
derives the storage id and the encryption key. Anything that is not exactly that shape is
no cookie at all, so a tampered or truncated cookie never costs a store lookup.
Where the session lives is the store's business.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
from collections import OrderedDict

from aiohttp import web

from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import SessionHandle
from gateway.settings import SessionSettings

log = logging.getLogger(__name__)

_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def encode_secret(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode()


def parse_secret(value: str | None) -> bytes | None:
    """The 32-byte secret a cookie value carries, or None for anything else."""
    if value is None or not _VALUE.fullmatch(value):
        return None
    try:
        return base64.urlsafe_b64decode(value + "=")
    except (binascii.Error, ValueError):
        return None


def cookie_value(request: web.Request, name: str) -> str | None:
    """The value of cookie ``name`` as sent, the first if the browser sent it twice.

    Read straight from the ``Cookie`` header: every session request needs one cookie, and
    aiohttp's full parse of them all costs more than the rest of the session lookup. With a
    duplicate, browsers send the most specific (longest path) first (RFC 6265 §5.4).
    """
    prefix = name + "="
    for header in request.headers.getall("Cookie", ()):
        for part in header.split(";"):
            part = part.strip()
            if part.startswith(prefix):
                return part[len(prefix) :]
    return None


class SessionCookies:
    """Reads and writes our two cookies with the attributes the settings ask for.

    Owns a bounded memo of cookie value -> handle: decoding the value and the two HKDF
    derivations cost more than the cached session lookup they lead to.
    """

    def __init__(self, settings: SessionSettings) -> None:
        self._settings = settings
        self.name = settings.cookie_name
        self.login_name = settings.login_cookie_name
        self._handles: OrderedDict[str, SessionHandle] = OrderedDict()
        self._handles_max = settings.local_cache_size

    def session_handle(self, request: web.Request) -> SessionHandle | None:
        value = self.session_value(request)
        return None if value is None else self.handle_of(value)

    def session_value(self, request: web.Request) -> str | None:
        """The session cookie as sent, None without one (``handle_of`` judges it)."""
        return cookie_value(request, self.name)

    def handle_of(self, value: str) -> SessionHandle | None:
        """The handle a session cookie's value leads to; None for a value we never issue."""
        handles = self._handles
        handle = handles.get(value)
        if handle is None:
            secret = parse_secret(value)
            if secret is None:
                return None  # not a value we issue: never remembered
            handle = handles[value] = derive_handle(secret)
            if len(handles) > self._handles_max:
                handles.popitem(last=False)
        return handle

    def has_session_cookie(self, request: web.Request) -> bool:
        return self.session_value(request) is not None

    def login_secret(self, request: web.Request) -> bytes | None:
        return parse_secret(cookie_value(request, self.login_name))

    def set_session(self, response: web.StreamResponse, secret: bytes) -> None:
        self._set(response, self.name, encode_secret(secret), self._settings.absolute_timeout_s)

    def set_login(self, response: web.StreamResponse, secret: bytes) -> None:
        self._set(response, self.login_name, encode_secret(secret), self._settings.login_timeout_s)

    def clear_session(self, response: web.StreamResponse) -> None:
        self._set(response, self.name, "", 0)

    def clear_login(self, response: web.StreamResponse) -> None:
        self._set(response, self.login_name, "", 0)

    def clear_session_header(self) -> str:
        """A ``Set-Cookie`` value that deletes the session cookie (for error responses)."""
        response = web.Response()
        self.clear_session(response)
        return response.cookies[self.name].OutputString()

    def _set(self, response: web.StreamResponse, name: str, value: str, max_age_s: int) -> None:
        settings = self._settings
        # SECURITY: HttpOnly (no script reads it), Secure, SameSite, host-only (no Domain),
        # Path=/ — together what the __Host- prefix demands of the browser.
        response.set_cookie(
            name,
            value,
            max_age=max_age_s,
            path="/",
            secure=settings.cookie_secure,
            httponly=True,
            samesite=settings.cookie_samesite,
        )
