"""What the HTTP/1.1 client raises besides ``TimeoutError`` and the loop's ``OSError``\\s.

Every one is a ``ConnectionError``, so a caller maps ``TimeoutError`` to 504 and any other
``OSError`` to 502 without knowing this tree; translating them into ``GatewayError``\\s is
``gateway.upstream``'s job.

    ConnectionError
    └── Http1Error
        ├── ServerDisconnectedError   closed before one byte of the response (retryable once)
        ├── IncompleteResponseError   closed before the response's framing said it ended
        ├── MalformedResponseError    not HTTP/1.1 llhttp accepts, or a protocol switch
        ├── InvalidRequestError       a request we will not send: CR, LF or NUL in its head,
        │                             or a body that does not match its Content-Length
        └── PoolClosedError           the pool was closed (shutdown) before or while waiting

Nothing else leaves this package: no ``ValueError`` or ``RuntimeError`` of ours reaches a
caller, so no upstream failure can become a 500.
"""

from __future__ import annotations


class Http1Error(ConnectionError):
    """The upstream connection failed or spoke something other than HTTP/1.1."""


class ServerDisconnectedError(Http1Error):
    """The connection closed before any byte of the response arrived."""


class IncompleteResponseError(Http1Error):
    """The connection closed in the middle of the response head or body."""


class MalformedResponseError(Http1Error):
    """llhttp rejected the response, or the upstream answered 101 Switching Protocols."""


class InvalidRequestError(Http1Error):
    """The request cannot be framed as sent: a byte that would split it, or a streamed body
    longer or shorter than the ``Content-Length`` it declared."""


class PoolClosedError(Http1Error):
    """The pool was closed before the request could have a connection."""
