"""What the HTTP/1.1 client raises besides ``TimeoutError`` and the loop's ``OSError``\\s.

Every one is a ``ConnectionError``, so a caller maps ``TimeoutError`` to 504 and any other
``OSError`` to 502 without knowing this tree; translating them into ``GatewayError``\\s is
``gateway.upstream``'s job.

    ConnectionError
    └── Http1Error
        ├── ServerDisconnectedError   closed before one byte of the response (retryable once)
        ├── IncompleteResponseError   closed before the response's framing said it ended
        └── MalformedResponseError    not HTTP/1.1 llhttp accepts, or a protocol switch
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
