"""Where a login may send the browser back to: a path on our own origin, nothing else.

SECURITY: an open redirect here would turn our login into a phishing tool. Accept only
an absolute path; refuse scheme-relative (``//evil``), backslashes (browsers read ``/\\evil``
as ``//evil``), control characters, and any of these hidden behind percent-encoding.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

DEFAULT = "/"
_MAX_LENGTH = 2048


def parse_return_to(value: str | None) -> str | None:
    """``value`` if it is a safe same-origin path, ``DEFAULT`` if absent, None if refused."""
    if value is None or value == "":
        return DEFAULT
    if len(value) > _MAX_LENGTH:
        return None
    candidates = [value]
    decoded = value
    for _ in range(3):  # double- and triple-encoded variants are still variants
        decoded = unquote(decoded)
        candidates.append(decoded)
    for candidate in candidates:
        if not candidate.startswith("/") or candidate.startswith("//"):
            return None
        if "\\" in candidate or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in candidate):
            return None
        parts = urlsplit(candidate)
        if parts.scheme or parts.netloc:
            return None
    return value
