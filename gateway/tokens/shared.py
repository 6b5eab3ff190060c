"""State the token checks keep beyond one request: values seen once (DPoP proof ids) and
cached answers (introspection), in this process or in Redis for every replica.

Callers hand in keys that are already digests (never a token or a proof) and bytes to keep;
what a key means is theirs (``tokens.dpop``, ``tokens.introspection``). Redis failures are
``SharedStateUnavailable``: whether that fails a request closed or only skips a cache is
the caller's call.

Redis keys, with ``p`` = ``session.key_prefix``: ``p:tok:<namespace>:<key>``, each with its
own expiry (SET NX PX for a value seen once, SET PX for an answer).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.sessions.redis_store import RedisClient


class SharedStateUnavailable(Exception):
    """Redis did not answer; nothing about the key is known."""


class TokenState(Protocol):
    async def remember_once(self, namespace: str, key: str, ttl_s: float) -> bool:
        """True the first time ``key`` is seen within ``ttl_s``; False for a repeat (or,
        in memory, when no room is left: a replay is never let through)."""
        ...

    async def get(self, namespace: str, key: str) -> bytes | None: ...

    async def put(self, namespace: str, key: str, value: bytes, ttl_s: float) -> None: ...

    async def aclose(self) -> None: ...


class MemoryTokenState:
    """One process's state. Each namespace keeps at most ``max_entries`` keys, oldest first
    out for answers; a full ``remember_once`` namespace refuses rather than forgets."""

    def __init__(
        self, *, max_entries: int = 500_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max = max_entries
        self._clock = clock
        # Per namespace, insertion order; entries are (expires_at, value).
        self._spaces: dict[str, OrderedDict[str, tuple[float, bytes]]] = {}

    def _space(self, namespace: str) -> OrderedDict[str, tuple[float, bytes]]:
        space = self._spaces.get(namespace)
        if space is None:
            space = self._spaces[namespace] = OrderedDict()
        return space

    def _sweep(self, space: OrderedDict[str, tuple[float, bytes]], now: float) -> None:
        # A namespace uses one TTL, so insertion order is expiry order: expired keys are
        # at the front.
        while space:
            key, (expires_at, _) = next(iter(space.items()))
            if expires_at > now:
                return
            del space[key]

    async def remember_once(self, namespace: str, key: str, ttl_s: float) -> bool:
        now = self._clock()
        space = self._space(namespace)
        self._sweep(space, now)
        found = space.get(key)
        if found is not None and found[0] > now:
            return False
        if len(space) >= self._max:
            return False  # SECURITY: forgetting a live key would let its replay through
        space[key] = (now + ttl_s, b"1")
        return True

    async def get(self, namespace: str, key: str) -> bytes | None:
        space = self._spaces.get(namespace)
        found = None if space is None else space.get(key)
        if found is None or found[0] <= self._clock():
            return None
        return found[1]

    async def put(self, namespace: str, key: str, value: bytes, ttl_s: float) -> None:
        now = self._clock()
        space = self._space(namespace)
        self._sweep(space, now)
        space.pop(key, None)
        space[key] = (now + ttl_s, value)
        while len(space) > self._max:
            space.popitem(last=False)

    async def aclose(self) -> None:
        self._spaces.clear()


class RedisTokenState:
    """Every replica's state, on a Redis client this object owns (``aclose`` closes it)."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        from redis.exceptions import RedisError  # here: a bearer-only process has no redis

        self._client = client
        self._prefix = prefix
        self._errors = (RedisError, OSError, TimeoutError)

    def _key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}:tok:{namespace}:{key}"

    async def remember_once(self, namespace: str, key: str, ttl_s: float) -> bool:
        try:
            fresh = await self._client.set(
                self._key(namespace, key), b"1", nx=True, px=max(int(ttl_s * 1000), 1)
            )
        except self._errors as exc:
            raise SharedStateUnavailable(type(exc).__name__) from None
        return bool(fresh)

    async def get(self, namespace: str, key: str) -> bytes | None:
        try:
            value = await self._client.get(self._key(namespace, key))
        except self._errors as exc:
            raise SharedStateUnavailable(type(exc).__name__) from None
        return None if value is None else bytes(value)

    async def put(self, namespace: str, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._client.set(self._key(namespace, key), value, px=max(int(ttl_s * 1000), 1))
        except self._errors as exc:
            raise SharedStateUnavailable(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._client.aclose()
