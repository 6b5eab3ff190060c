"""Token capture: a login that is an API call (``POST /User/Login``, a password grant)
whose JSON reply carries tokens. On a route with ``capture_tokens`` the reply's tokens
become a new server-side session and the browser gets the reply without them, plus the
session cookie.

SECURITY: capture fails closed. The browser never gets the upstream's bytes, only our own
serialization of the reply's JSON object, filtered (an empty body stays empty). A body that
is not one JSON object read strictly (an XSSI prefix ``)]}'``, NDJSON, HTML, a form,
``NaN``, nesting deeper than 64), or that comes under a content-coding other than
``identity`` or a transfer-coding other than plain ``chunked`` (``gzip, chunked``), is a
502 ``upstream_unavailable`` with a fixed description: the login API answered, but with
nothing we can make safe (RFC 9110 §15.6.3: an invalid response from behind a gateway).
The reason phrase and the kept header fields are the upstream's, written into our head: a
CR, LF or other control character but HTAB in them is a 502 too, as for any relayed reply
(``upstream``'s ``upstream_head_refused``), and no session is started.

``strip_tokens`` drops, at any depth:

- members named like a token (the name, ignoring case, ``_`` and ``-``, contains
  ``accesstoken``, ``refreshtoken`` or ``idtoken``) and the values at the configured token
  paths. Every string at or under them is a *known* token (this reply's access, refresh
  and ID tokens);
- every member whose name or value, and every array element that, holds a known token or
  any JWT (base64url segments joined by dots, the first a JSON object), whole or inside a
  longer string (``"Bearer <AT>"``, ``"refresh=<RT>"``). The member or element goes, not
  just the token: nothing of such a string survives, and the rest keeps its shape;
- when the reply starts no session (a failed login: not 2xx, a success flag that says no,
  no access token), no token is known for sure, so also every string holding an opaque
  token's shape: a run of 20 or more RFC 6750 §2.1 b64token characters (letters, digits,
  ``-._~+/``) with a letter and a digit. Error codes and messages pass
  (``INVALID_CREDENTIALS``, ``Invalid username or password``); UUIDs and hashes do not.

Headers go by the same test, as do Set-Cookie for our cookies and for cookies or headers
named like a token. ``claims_paths`` keep only scalars (string, number, boolean) the test
passes, and the subject must pass it too: ``/auth/session`` shows them. Not caught: a token
the upstream transforms (encodes, splits), and in a successful reply an opaque token under
another name that is none of this reply's known tokens.

Sessions made here have no OIDC login behind them. Without ``oidc.issuer`` (or
``oidc.jwks_uri``) tokengate cannot verify the tokens: the access token is treated as
opaque and trusted as the system behind the route issued it, over the route's connection;
a JWT's claims (``sub``, ``exp``, scopes) are read unverified. Forwarding is
``upstream``'s; refreshing these sessions is the refresh dialect's (``idp.json_dialect``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway.bff.session_start import SessionStarter
from gateway.errors import UpstreamTimeoutError, UpstreamUnavailableError
from gateway.idp.json_dialect import parse_token_reply
from gateway.idp.json_paths import (
    MAX_JSON_REPLY_BYTES,
    holds_jwt,
    holds_opaque_token,
    members_in,
    parse_json_object,
    read_limited,
    remove_members,
    remove_path,
    remove_scalars,
    strings_in,
    value_at,
)
from gateway.idp.tokens import parse_unverified_claims
from gateway.metrics import Metrics
from gateway.principal import parse_scopes
from gateway.routing import Route
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.model import Session, SessionStore
from gateway.set_cookie import CookieGuard, parse_set_cookie_name
from gateway.settings import CaptureSettings, JsonResponsePaths
from gateway.upstream import (
    HOP_BY_HOP,
    UpstreamHeaders,
    UpstreamReply,
    as_sent,
    connection_tokens,
    header_values,
    refuse_head,
    response_has_body,
)

log = logging.getLogger(__name__)

# SECURITY: names removed from every reply of a capture route besides the configured paths:
# the browser must never see a token, even one we were not told about.
_TOKEN_NAMES = ("accesstoken", "refreshtoken", "idtoken")
# The body is always ours; these describe the upstream's bytes, or what it may not set.
_DROP = HOP_BY_HOP | {
    "content-length",
    "content-type",
    "content-encoding",
    "content-range",
    "content-md5",
    "etag",
    "digest",
    "content-digest",
    "repr-digest",
}
_UNREADABLE = "the login reply is not a JSON object that can be relayed safely"


def _normalised(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _token_named(name: str) -> bool:
    folded = _normalised(name)
    return any(token_name in folded for token_name in _TOKEN_NAMES)


@dataclass(frozen=True, slots=True)
class TokenFilter:
    """What of one capture reply must not reach the browser: ``known`` tokens and JWTs
    anywhere in a string, and with ``opaque`` (the login failed) opaque-token-like runs."""

    known: frozenset[str]
    opaque: bool

    def holds_token(self, value: Any) -> bool:
        """For a member name, a JSON scalar or a header value. Pure."""
        if isinstance(value, bool) or value is None:
            return False
        text = value if isinstance(value, str) else json.dumps(value)  # a number's digits
        return (
            any(token in text for token in self.known)
            or holds_jwt(text)
            or (self.opaque and holds_opaque_token(text))
        )


def parse_known_tokens(reply: Any, paths: JsonResponsePaths) -> frozenset[str]:
    """Every non-empty string at or under a configured token path or a member named like a
    token, at any depth: the reply's tokens, whatever else it says. Pure."""
    found: set[str] = set()
    for path in (paths.access_token, paths.refresh_token):
        if path is not None:
            found.update(strings_in(value_at(reply, path)))
    for name, value in members_in(reply):
        if _token_named(name):
            found.update(strings_in(value))
    found.discard("")
    return frozenset(found)


def strip_tokens(
    reply: dict[str, Any], paths: JsonResponsePaths, tokens: TokenFilter
) -> dict[str, Any]:
    """``reply`` without its token members (the configured paths, any member named like a
    token) and without every member or element ``tokens`` finds a token in. Pure."""
    data: Any = reply
    for path in (paths.access_token, paths.refresh_token):
        if path is not None:
            data, _ = remove_path(data, path)
    data, _ = remove_members(data, lambda name, _: _token_named(name))
    stripped: dict[str, Any] = remove_scalars(data, tokens.holds_token)
    return stripped


def parse_claims(
    reply: Any, claims_paths: Mapping[str, str], tokens: TokenFilter
) -> dict[str, Any]:
    """The claims at ``claims_paths``: strings, numbers and booleans that hold no token.
    SECURITY: ``/auth/session`` shows them; a list, an object or null is not kept. Pure."""
    claims: dict[str, Any] = {}
    for name, path in claims_paths.items():
        value = value_at(reply, path)
        if isinstance(value, str | int | float) and not tokens.holds_token(value):
            claims[name] = value
    return claims


def parse_subject(
    reply: Any, settings: CaptureSettings, claims: Mapping[str, Any], tokens: TokenFilter
) -> str:
    """The subject: the reply's ``subject_path``, else the JWT's ``sub``, else "unknown";
    never one holding a token (``/auth/session`` shows it). Pure."""
    if settings.subject_path is not None:
        value = value_at(reply, settings.subject_path)
        if isinstance(value, str | int) and not isinstance(value, bool):
            subject = str(value)
            if subject and not tokens.holds_token(subject):
                return subject
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub and not tokens.holds_token(sub) else "unknown"


class TokenCapture:
    def __init__(
        self,
        store: SessionStore,
        cookies: SessionCookies,
        default_lifetime_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        check_csrf: Callable[[web.Request], None] | None = None,
    ) -> None:
        self._store = store
        self._cookies = cookies
        self._guard = CookieGuard(frozenset((cookies.name, cookies.login_name)))
        self._default_lifetime_s = default_lifetime_s
        self._metrics = metrics
        self._starter = SessionStarter(store, cookies, metrics)
        self._clock = clock
        self._check_csrf = check_csrf

    def prepare(self, request: web.Request, headers: UpstreamHeaders) -> None:
        """Before a login is forwarded: the CSRF check, and ask for a reply we can read."""
        # SECURITY: a login sets our cookie; without the CSRF header a cross-site form could
        # log the browser into someone else's account (login CSRF).
        if self._check_csrf is not None:
            self._check_csrf(request)
        # A compressed reply could not be read for tokens (and would pass them through).
        headers.set("Accept-Encoding", "identity")

    async def relay(
        self,
        request: web.Request,
        route: Route,
        upstream_response: UpstreamReply,
        settings: CaptureSettings,
    ) -> web.StreamResponse:
        """The upstream's reply for the browser, rebuilt from its JSON object without its
        tokens; a session cookie in when the reply was a successful login."""
        upstream = upstream_response
        refused = _refused_coding(upstream.headers)
        if refused is not None:
            upstream.close()
            raise _unreadable(route, refused)
        # A reason phrase we would refuse anyway is refused before the body is read.
        refuse_head(upstream, upstream.reason)
        if not response_has_body(request.method, upstream.status):
            upstream.release()
            raw = b""
        else:
            raw = await self._read(upstream, route)
        reply = parse_json_object(raw) if raw else None
        if raw and reply is None:
            raise _unreadable(route, "not_a_json_object")
        known = frozenset() if reply is None else parse_known_tokens(reply, settings.response)
        session = None
        if reply is not None:
            session = self._session_of(upstream.status, reply, settings, known)
        tokens = TokenFilter(known, opaque=session is None)
        headers = self._headers(upstream, tokens)
        # SECURITY: the kept fields are the upstream's, checked as they would be written
        # (``_headers`` holds values ``as_sent``), before the response is built and before a
        # session is started: no cookie goes out, nor is a session stored, for a reply we
        # refuse. The fields we add (Content-Type, Cache-Control, our cookie) are ours.
        refuse_head(upstream, *(text for field in headers.items() for text in field))
        body = None
        if reply is not None:
            stripped = strip_tokens(reply, settings.response, tokens)
            body = json.dumps(stripped, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json; charset=utf-8"
        response = web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=body
        )
        response.headers["Cache-Control"] = "no-store"
        if session is not None:
            await self._starter.start(request, response, session)
            log.info("login", extra={"result": "success", "via": "capture", "route": route.name})
        return response

    async def _read(self, upstream: UpstreamReply, route: Route) -> bytes:
        try:
            raw = await read_limited(upstream.iter_chunks(), MAX_JSON_REPLY_BYTES)
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except OSError as exc:
            raise UpstreamUnavailableError() from exc
        if raw is None:
            upstream.close()  # the rest is unread
            raise _unreadable(route, "too_large")
        return raw

    def _headers(self, upstream: UpstreamReply, tokens: TokenFilter) -> CIMultiDict[str]:
        drop = _DROP | connection_tokens(header_values(upstream.headers, "connection"))
        # SECURITY: each value is judged as the browser gets it (``as_sent``): a byte that
        # is not UTF-8, dropped on the way out, must not hide a token or our cookie's name.
        sent = ((name, as_sent(value)) for name, value in upstream.headers)
        return CIMultiDict(
            (name, value)
            for name, value in sent
            if name.lower() not in drop
            and not (name.lower() == "set-cookie" and self._forbidden_cookie(value))
            # SECURITY: a token echoed in a header (X-Access-Token) is a token all the same.
            and not _token_named(name)
            and not tokens.holds_token(value)
        )

    def _forbidden_cookie(self, set_cookie: str) -> bool:
        """An upstream must not plant our cookies (fixation) nor hand the browser a token
        as a cookie of its own (``refreshToken=...``)."""
        return self._guard.plants(set_cookie) or _token_named(
            parse_set_cookie_name(set_cookie) or ""
        )

    def _session_of(
        self, status: int, reply: Any, settings: CaptureSettings, known: frozenset[str]
    ) -> Session | None:
        """The session a successful login reply starts, or None."""
        now = self._clock()
        tokens_of = parse_token_reply(
            status, reply, settings.response, self._default_lifetime_s, now=now
        )
        if tokens_of is None:
            return None
        access_token = tokens_of.access_token
        jwt_claims = dict(parse_unverified_claims(access_token))
        tokens = TokenFilter(known, opaque=False)
        subject = parse_subject(reply, settings, jwt_claims, tokens)
        claims = {"sub": subject, **parse_claims(reply, settings.claims_paths, tokens)}
        return Session(
            subject=subject,
            access_token=access_token,
            access_expires_at=tokens_of.expires_at,
            refresh_token=tokens_of.refresh_token,
            scopes=tuple(sorted(parse_scopes(jwt_claims))),
            claims=claims,
            created_at=now,
        )


def _refused_coding(headers: list[tuple[str, str]]) -> str | None:
    """Why a reply's codings keep it from being read, or None. SECURITY: we asked for
    ``identity``; under any other coding (``gzip``, or ``gzip, chunked``, whose chunks
    both clients hand over still compressed) tokens would pass unseen."""
    content = _codings(headers, "content-encoding")
    if any(coding != "identity" for coding in content):
        return "content_encoding"
    if _codings(headers, "transfer-encoding") not in ([], ["chunked"]):
        return "transfer_encoding"
    return None


def _codings(headers: list[tuple[str, str]], name: str) -> list[str]:
    # Every line of the field, each a comma-separated list; empty elements are no coding
    # (RFC 9110 §5.6.1).
    values = header_values(headers, name)
    codings = (coding.strip().lower() for value in values for coding in value.split(","))
    return [coding for coding in codings if coding]


def _unreadable(route: Route, reason: str) -> UpstreamUnavailableError:
    log.warning("capture_refused", extra={"route": route.name, "reason": reason})
    if reason == "too_large":
        return UpstreamUnavailableError("the login reply is too large")
    return UpstreamUnavailableError(_UNREADABLE)
