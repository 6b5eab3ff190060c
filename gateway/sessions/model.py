"""The session as a value, and the interface every session store implements.

A ``SessionHandle`` is what the cookie proves: a storage id (a hash of the cookie's secret,
safe to store) and the per-session encryption key (never stored). Stores persist ``Session``
values encrypted under that key; how, and with which TTLs, is each backend's business
(``sessions.redis_store``, ``sessions.memory_store``). The cookie itself is ``sessions.cookie``'s.
``Waiters`` is the stores' one way of waking whoever waits on a session (its refresh lock,
its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SessionHandle:
    storage_id: str  # hex; a one-way hash of the cookie secret, safe to keep in Redis
    key: bytes = field(repr=False)  # AES-256-GCM key; lives only in the cookie

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("a session key is 32 bytes")


@dataclass(frozen=True, slots=True)
class Session:
    subject: str
    access_token: str = field(repr=False)
    access_expires_at: float
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    idp_session_id: str | None = None  # the IdP's `sid`, for back-channel logout
    created_at: float = 0.0
    # When a refresh obtained the current access token; 0.0 for the login's token, and in
    # sessions stored before this field existed (they read it as its default).
    refreshed_at: float = 0.0
    version: int = 0  # bumped by every successful compare-and-set write

    def to_json(self) -> bytes:
        data = asdict(self)
        data.pop("version")  # the store keeps the version outside the ciphertext
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, version: int) -> Session:
        data = json.loads(raw)
        data["scopes"] = tuple(data.get("scopes", ()))
        # A field a later release added is dropped, not a reason to end the session: during
        # a rolling upgrade both releases read what either wrote (the JSON is sealed, so
        # every key in it is ours).
        known = {key: value for key, value in data.items() if key in _SESSION_FIELDS}
        return cls(**known, version=version)

    def with_tokens(
        self,
        *,
        access_token: str,
        access_expires_at: float,
        refresh_token: str | None,
        id_token: str | None,
        scopes: tuple[str, ...] | None = None,
        refreshed_at: float | None = None,
    ) -> Session:
        return replace(
            self,
            access_token=access_token,
            access_expires_at=access_expires_at,
            # RFC 6749 §6: a provider that does not rotate returns no refresh token: keep ours.
            refresh_token=refresh_token or self.refresh_token,
            id_token=id_token or self.id_token,
            scopes=self.scopes if scopes is None else scopes,
            refreshed_at=self.refreshed_at if refreshed_at is None else refreshed_at,
        )


_SESSION_FIELDS = frozenset(Session.__dataclass_fields__) - {"version"}


@dataclass(frozen=True, slots=True)
class LoginState:
    """What the callback needs from the login that started it (PKCE, nonce, where to go)."""

    binding: str  # hash of the browser's login-binding cookie
    code_verifier: str = field(repr=False)
    nonce: str
    return_to: str
    created_at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LoginState:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class RefreshBackoff:
    """After failed refreshes of a session, when the IdP may be asked again (every replica
    reads it from the store; ``sessions.backoff`` computes it)."""

    attempts: int  # consecutive failed refreshes
    until: float  # wall-clock time before which no refresh is tried


@dataclass(frozen=True, slots=True)
class SessionWatch:
    """What ``SessionStore.watch`` hands out while a session is watched."""

    # Done when the session may have been written or ended, on any replica (or the news of
    # it may have been lost): load it to know which. Never done while ``told`` is False.
    changed: asyncio.Future[None]
    told: bool  # False: the store cannot tell now (no invalidation feed), so poll


class Waiters(dict[str, set[asyncio.Future[None]]]):
    """Futures by storage id, each done at the next ``wake`` of its id (or ``wake_all``).

    An id is a key only while someone waits on it (``waiting``), so a connection that
    watches its session for hours leaves nothing behind when it goes."""

    @contextlib.contextmanager
    def waiting(self, storage_id: str) -> Iterator[asyncio.Future[None]]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self.setdefault(storage_id, set())
        waiters.add(waiter)
        try:
            yield waiter
        finally:
            waiters.discard(waiter)
            if not waiters and self.get(storage_id) is waiters:
                del self[storage_id]

    def wake(self, storage_id: str) -> None:
        for waiter in self.get(storage_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def wake_all(self) -> None:
        for storage_id in list(self):
            self.wake(storage_id)


class SessionStore(Protocol):
    """Every backend: Redis for production, memory for one replica and the demo.

    Every method raises ``SessionStoreUnavailableError`` when the backend cannot answer;
    nothing else escapes. Absent, expired or undecryptable data reads as ``None``.
    """

    async def create(self, handle: SessionHandle, session: Session) -> Session:
        """Store a new session (version 1) with idle and absolute timeouts; index its sub/sid."""

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        """The session, or None; slides the idle timeout (never past the absolute one).

        ``cached``: a copy this process loaded within ``session.local_cache_s`` will do,
        unless a write or an end of the session was published since (the request path).
        Without it the answer is Redis's own (the refresh protocol, logout)."""

    def cached(self, handle: SessionHandle) -> Session | None:
        """What ``load(handle, cached=True)`` would answer from this process's copy, without
        an await; None when it would ask the backend (no copy, or none kept here)."""

    async def save(self, handle: SessionHandle, session: Session) -> Session | None:
        """Compare-and-set: write ``session`` only if the stored version is still
        ``session.version``; return the stored session with the new version, or None when
        another writer got there first (or the session is gone)."""

    async def delete(self, handle: SessionHandle) -> bool:
        """End one session; True when it existed."""

    async def delete_by_subject(self, subject: str) -> int:
        """End every session of ``sub`` (back-channel logout); returns how many."""

    async def delete_by_idp_session(self, idp_session_id: str) -> int:
        """End every session of the IdP's ``sid`` (back-channel logout); returns how many."""

    async def put_login_state(self, state: str, key: bytes, login: LoginState, ttl_s: int) -> None:
        """Keep a pending login under ``state``, encrypted with ``key``."""

    async def take_login_state(self, state: str, key: bytes) -> LoginState | None:
        """Return and delete the pending login (one use: a replayed state finds nothing)."""

    async def remember_once(self, namespace: str, value: str, ttl_s: int) -> bool:
        """True the first time ``value`` is seen in ``namespace`` within ``ttl_s`` (jti replay)."""

    async def acquire_lock(self, handle: SessionHandle, token: str, ttl_s: float) -> bool:
        """SET NX PX the session's refresh lock with our random token."""

    async def release_lock(self, handle: SessionHandle, token: str) -> bool:
        """Compare-and-delete: release only if the lock still holds our token."""

    async def wait_for_unlock(self, handle: SessionHandle, timeout_s: float) -> None:
        """Return once the lock is released (or has expired), or after ``timeout_s``."""

    async def load_backoff(self, handle: SessionHandle) -> RefreshBackoff | None:
        """The session's refresh backoff, or None: no failure since the last success, or
        none within the TTL it was saved with."""

    async def save_backoff(
        self, handle: SessionHandle, backoff: RefreshBackoff, ttl_s: float
    ) -> None:
        """Keep ``backoff`` for ``ttl_s`` (beyond its ``until``, so that consecutive failures
        keep counting); ends with the session."""

    async def clear_backoff(self, handle: SessionHandle) -> None:
        """Forget the session's backoff: a refresh succeeded."""

    def watch(self, storage_id: str) -> AbstractContextManager[SessionWatch]:
        """Be told when the session may have ended, for as long as the context lasts.

        ``changed`` is done at a write or an end of the session on any replica, or when
        such news may have been lost (the invalidation feed broke or came back); the
        watcher then loads the session to see whether it still exists. Enter the context
        *before* that load, so that an end in between is not missed. When ``told`` is
        False (no feed now) nothing will come, and the watcher polls."""

    def deadline(self) -> AbstractContextManager[None]:
        """Give every call of this store made in this context (and in tasks started from
        it) one deadline: the backend's timeout from now. A request enters it once, so its
        calls together, retries included, take no longer than that; past it they raise
        ``SessionStoreUnavailableError``. Outside it, each call is bounded by itself."""

    async def ping(self) -> bool:
        """True when the backend answers (readiness)."""

    async def aclose(self) -> None:
        """Release the connection pool."""
