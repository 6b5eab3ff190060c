"""Which cookie a ``Set-Cookie`` from an upstream would set in a browser, and whether it
is one of ours: the one filter both the relay (``upstream``) and token capture use.

An upstream must never plant our session or login-binding cookie (session fixation,
login CSRF). Comparing prefixes of the header value is not enough: browsers trim the name,
and a nameless cookie (``=__Host-tokengate=...``) is sent back as its value alone, which a
server reads as a cookie of that name. So the name is parsed as a browser parses it.
Setting our own cookies is ``sessions.cookie``'s job.
"""

from __future__ import annotations

import re

# RFC 6265bis §5.6 step 1: a cookie string with a control character (other than HTAB) is
# ignored entirely by the browser; we drop it too.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_WSP = " \t"


def parse_set_cookie_name(set_cookie: str) -> str | None:
    """The name under which a browser would send this cookie back, or None if it would
    ignore the header (RFC 6265bis §5.6). Pure.

    The name-value pair is the text before the first ``;``; its name is what precedes the
    first ``=``, with spaces and tabs trimmed. A pair without a name (no ``=``, or nothing
    before it) is a nameless cookie, sent back as its value alone: its effective name is
    then what a server reads from that value, the text before its ``=``.
    """
    if _CONTROL.search(set_cookie):
        return None
    pair = set_cookie.split(";", 1)[0]
    name, equals, value = pair.partition("=")
    name = name.strip(_WSP)
    if equals and name:
        return name
    nameless = value if equals else name  # "=a=b" is sent as "a=b"; "a" as "a"
    return nameless.strip(_WSP).partition("=")[0].strip(_WSP)


class CookieGuard:
    """Decides whether an upstream's ``Set-Cookie`` value would set one of ``names``
    (compared case-sensitively, as browsers compare cookie names)."""

    __slots__ = ("_names",)

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names

    def __bool__(self) -> bool:
        return bool(self._names)

    def plants(self, set_cookie: str) -> bool:
        """True when the browser would store this as one of our cookies, or would ignore
        it anyway (a control character): either way it is not relayed."""
        name = parse_set_cookie_name(set_cookie)
        return name is None or name in self._names
