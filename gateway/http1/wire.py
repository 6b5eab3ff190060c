"""Request serialisation: the head of an HTTP/1.1 request and the framing of its body.

Pure functions over bytes. Hop-by-hop headers are the caller's to strip; this module only
owns the framing headers (``Content-Length``, ``Transfer-Encoding``) and ``Host``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from gateway.http1.errors import InvalidRequestError

Body = bytes | AsyncIterator[bytes] | None

# RFC 9110 §8.6: send Content-Length: 0 where the method gives content a meaning.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_HOST = b"host"
CHUNKED_END = b"0\r\n\r\n"
# RFC 9110 §6.4.1: responses that never have content, whatever their headers say (with
# any response to HEAD). Defined once; the connection, the relay and capture read it.
NO_BODY_STATUSES = frozenset({204, 304})


def build_authority(host: str, port: int) -> bytes:
    """The ``Host`` value for an origin: RFC 9110 §7.2, brackets around an IPv6 literal."""
    name = f"[{host}]" if ":" in host else host
    encoded = name.encode("ascii") if name.isascii() else name.encode("idna")
    return encoded if port == 80 else b"%s:%d" % (encoded, port)


def build_head(
    method: str,
    target: bytes,
    authority: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: Body,
) -> tuple[bytes, int | None]:
    """The request head, and for a streamed body its declared length (``None``: chunked).

    A bytes body (or none) gets our own ``Content-Length``; a stream keeps the caller's
    ``Content-Length`` if it gave one and is sent chunked otherwise (RFC 9112 §6.1).
    """
    streamed = body is not None and not isinstance(body, bytes)
    declared: int | None = None
    # Slot 4 is for Host: RFC 9112 §3.2 wants it first after the request line.
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", b""]
    lines = 2  # the request line and the empty line that ends the head
    has_host = False
    for name, value in headers:
        lname = name.lower()
        if lname == _CONTENT_LENGTH:
            if streamed:
                if not value.strip().isdigit():
                    raise InvalidRequestError("invalid Content-Length for a streamed body")
                declared = int(value)
            continue
        if lname == _TRANSFER_ENCODING:
            continue
        if lname == _HOST:
            has_host = True
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    if not has_host:
        parts[4] = b"Host: " + authority + b"\r\n"
        lines += 1
    if body is None:
        if method in _BODY_METHODS:
            parts.append(b"Content-Length: 0\r\n")
            lines += 1
    elif isinstance(body, bytes):
        parts.append(b"Content-Length: %d\r\n" % len(body))
        lines += 1
    elif declared is not None:
        parts.append(b"Content-Length: %d\r\n" % declared)
        lines += 1
    else:
        parts.append(b"Transfer-Encoding: chunked\r\n")
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # SECURITY: a CR, LF or NUL inside a name, value or target would split the request
    # (header injection, smuggling); values can come from token claims. One count per byte
    # class, each a memchr-speed scan, instead of a check per header.
    if (
        head.count(b"\n") != lines
        or head.count(b"\r") != lines
        or b"\x00" in head
        or b" " in target
    ):
        raise InvalidRequestError("a header or the target contains CR, LF, NUL or (target) a space")
    return head, declared


def frame_chunk(chunk: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body (RFC 9112 §7.1), as parts for ``writelines``."""
    return b"%x\r\n" % len(chunk), chunk, b"\r\n"
