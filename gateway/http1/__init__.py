"""A lean keep-alive HTTP/1.1 client for the upstream hop, on asyncio and llhttp.

``Http1Pool`` owns connections per (host, port) and sends requests; ``Http1Response``
streams the answer back. It speaks plain HTTP/1.1 over TCP only: no TLS, proxies, redirects,
cookies or decompression. Deciding what to forward is ``gateway.upstream``'s job.
"""

from gateway.http1.errors import (
    Http1Error,
    IncompleteResponseError,
    InvalidRequestError,
    MalformedResponseError,
    PoolClosedError,
    ServerDisconnectedError,
)
from gateway.http1.pool import Http1Pool
from gateway.http1.response import Http1Response

__all__ = [
    "Http1Error",
    "Http1Pool",
    "Http1Response",
    "IncompleteResponseError",
    "InvalidRequestError",
    "MalformedResponseError",
    "PoolClosedError",
    "ServerDisconnectedError",
]
