"""The session store in this process's memory: one replica, the demo and tests.

Same semantics as ``sessions.redis_store``: sealed blobs, sliding idle and absolute
timeouts, compare-and-set, one-use login states, a lock whose waiters wake on release, and
watchers told of a session's writes and end. Expiry is checked on access against the injected clock,
and expired entries are swept on writes (amortised), so no background task is needed; a
watcher learns of an expiry when it next loads. Nothing survives a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace

from gateway.sessions.crypto import digest, open_sealed, open_session, seal, seal_session, slot_aad
from gateway.sessions.model import (
    LoginState,
    RefreshBackoff,
    Session,
    SessionHandle,
    SessionWatch,
    Waiters,
)
from gateway.settings import SessionSettings

_MIN_SWEEP_WRITES = 64


@dataclass(slots=True)
class _Entry:
    blob: bytes
    expires_at: float


@dataclass(slots=True)
class _StoredSession:
    blob: bytes
    version: int
    created_at: float
    expires_at: float
    subject: str
    idp_session_id: str | None


@dataclass(slots=True)
class _Lock:
    token: str
    expires_at: float
    released: asyncio.Event = field(default_factory=asyncio.Event)


class MemorySessionStore:
    """``SessionStore`` in a dict; every method completes without awaiting, so atomically."""

    def __init__(self, settings: SessionSettings, clock: Callable[[], float] = time.time) -> None:
        self._idle_s = float(settings.idle_timeout_s)
        self._absolute_s = float(settings.absolute_timeout_s)
        self._clock = clock
        self._sessions: dict[str, _StoredSession] = {}
        self._by_subject: dict[str, set[str]] = {}
        self._by_idp_session: dict[str, set[str]] = {}
        self._logins: dict[str, _Entry] = {}
        self._once: dict[str, float] = {}
        self._locks: dict[str, _Lock] = {}
        self._backoffs: dict[str, tuple[RefreshBackoff, float]] = {}  # and when it expires
        self._watchers = Waiters()
        self._writes_since_sweep = 0

    def _expires_at(self, created_at: float, now: float) -> float:
        return min(now + self._idle_s, created_at + self._absolute_s)

    def _live_session(self, storage_id: str) -> _StoredSession | None:
        stored = self._sessions.get(storage_id)
        if stored is not None and stored.expires_at <= self._clock():
            self._drop_session(storage_id)
            return None
        return stored

    def _drop_session(self, storage_id: str) -> bool:
        stored = self._sessions.pop(storage_id, None)
        if stored is None:
            return False
        self._watchers.wake(storage_id)
        self._backoffs.pop(storage_id, None)
        _discard(self._by_subject, stored.subject, storage_id)
        if stored.idp_session_id:
            _discard(self._by_idp_session, stored.idp_session_id, storage_id)
        return True

    def _wrote(self) -> None:
        # Amortised O(1): a full sweep once per as many writes as there are entries.
        self._writes_since_sweep += 1
        if self._writes_since_sweep < max(_MIN_SWEEP_WRITES, len(self._sessions)):
            return
        self._writes_since_sweep = 0
        now = self._clock()
        for storage_id in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            self._drop_session(storage_id)
        for state_id in [k for k, e in self._logins.items() if e.expires_at <= now]:
            del self._logins[state_id]
        for key in [k for k, expires_at in self._once.items() if expires_at <= now]:
            del self._once[key]
        for storage_id in [k for k, lock in self._locks.items() if lock.expires_at <= now]:
            self._release(storage_id)
        for storage_id in [k for k, (_, at) in self._backoffs.items() if at <= now]:
            del self._backoffs[storage_id]

    async def create(self, handle: SessionHandle, session: Session) -> Session:
        now = self._clock()
        created_at = session.created_at or now
        expires_at = self._expires_at(created_at, now)
        if expires_at <= now:
            raise ValueError("the session is already past its absolute timeout")
        stored = replace(session, created_at=created_at, version=1)
        self._drop_session(handle.storage_id)
        self._sessions[handle.storage_id] = _StoredSession(
            blob=seal_session(handle, stored),
            version=1,
            created_at=created_at,
            expires_at=expires_at,
            subject=stored.subject,
            idp_session_id=stored.idp_session_id,
        )
        self._by_subject.setdefault(stored.subject, set()).add(handle.storage_id)
        if stored.idp_session_id:
            self._by_idp_session.setdefault(stored.idp_session_id, set()).add(handle.storage_id)
        self._wrote()
        return stored

    def cached(self, handle: SessionHandle) -> Session | None:
        return None  # no copies: every load is this store's own (it slides the idle timeout)

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        stored = self._live_session(handle.storage_id)
        if stored is None:
            return None
        stored.expires_at = self._expires_at(stored.created_at, self._clock())
        return open_session(handle, stored.blob, stored.version)

    async def save(self, handle: SessionHandle, session: Session) -> Session | None:
        stored = self._live_session(handle.storage_id)
        if stored is None or stored.version != session.version:
            return None  # gone (never resurrected) or another writer came first
        stored.blob = seal_session(handle, session)
        stored.version += 1
        stored.expires_at = self._expires_at(stored.created_at, self._clock())
        self._watchers.wake(handle.storage_id)  # as Redis publishes a write
        return replace(session, version=stored.version)

    async def delete(self, handle: SessionHandle) -> bool:
        return self._delete(handle.storage_id)

    def _delete(self, storage_id: str) -> bool:
        existed = self._live_session(storage_id) is not None
        self._drop_session(storage_id)
        self._release(storage_id)  # as in Redis: ending a session frees its lock
        return existed

    async def delete_by_subject(self, subject: str) -> int:
        return sum(self._delete(sid) for sid in list(self._by_subject.get(subject, ())))

    async def delete_by_idp_session(self, idp_session_id: str) -> int:
        ids = list(self._by_idp_session.get(idp_session_id, ()))
        return sum(self._delete(storage_id) for storage_id in ids)

    async def put_login_state(self, state: str, key: bytes, login: LoginState, ttl_s: int) -> None:
        state_id = digest(state)
        blob = seal(key, login.to_json(), slot_aad("login", state_id))
        self._logins[state_id] = _Entry(blob, self._clock() + ttl_s)
        self._wrote()

    async def take_login_state(self, state: str, key: bytes) -> LoginState | None:
        state_id = digest(state)
        entry = self._logins.pop(state_id, None)  # one use, even with the wrong key
        if entry is None or entry.expires_at <= self._clock():
            return None
        plaintext = open_sealed(key, entry.blob, slot_aad("login", state_id))
        return None if plaintext is None else LoginState.from_json(plaintext)

    async def remember_once(self, namespace: str, value: str, ttl_s: int) -> bool:
        key = f"{namespace}:{digest(value)}"
        now = self._clock()
        if self._once.get(key, now) > now:
            return False
        self._once[key] = now + ttl_s
        self._wrote()
        return True

    def _live_lock(self, storage_id: str) -> _Lock | None:
        lock = self._locks.get(storage_id)
        if lock is not None and lock.expires_at <= self._clock():
            self._release(storage_id)
            return None
        return lock

    def _release(self, storage_id: str) -> None:
        lock = self._locks.pop(storage_id, None)
        if lock is not None:
            lock.released.set()

    async def acquire_lock(self, handle: SessionHandle, token: str, ttl_s: float) -> bool:
        if self._live_lock(handle.storage_id) is not None:
            return False
        self._locks[handle.storage_id] = _Lock(token, self._clock() + ttl_s)
        self._wrote()
        return True

    async def release_lock(self, handle: SessionHandle, token: str) -> bool:
        lock = self._live_lock(handle.storage_id)
        if lock is None or lock.token != token:
            return False  # expired, or now someone else's
        self._release(handle.storage_id)
        return True

    async def wait_for_unlock(self, handle: SessionHandle, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (lock := self._live_lock(handle.storage_id)) is not None:
            # Wake on release, or when the lock's TTL runs out, whichever comes first.
            wait_s = min(deadline - loop.time(), lock.expires_at - self._clock())
            if wait_s <= 0:
                return
            try:
                async with asyncio.timeout(wait_s):
                    await lock.released.wait()
            except TimeoutError:
                if loop.time() >= deadline:
                    return

    async def load_backoff(self, handle: SessionHandle) -> RefreshBackoff | None:
        kept = self._backoffs.get(handle.storage_id)
        if kept is None or kept[1] <= self._clock():
            return None
        return kept[0]

    async def save_backoff(
        self, handle: SessionHandle, backoff: RefreshBackoff, ttl_s: float
    ) -> None:
        self._backoffs[handle.storage_id] = (backoff, self._clock() + ttl_s)
        self._wrote()

    async def clear_backoff(self, handle: SessionHandle) -> None:
        self._backoffs.pop(handle.storage_id, None)

    @contextmanager
    def watch(self, storage_id: str) -> Iterator[SessionWatch]:
        # One process: every write passes through ``save`` and every end through
        # ``_drop_session``, so watchers are always told.
        with self._watchers.waiting(storage_id) as ended:
            yield SessionWatch(ended, told=True)

    @property
    def watched(self) -> int:
        """How many sessions are watched now: none once every watcher has left."""
        return len(self._watchers)

    def deadline(self) -> AbstractContextManager[None]:
        return nullcontext()  # every call completes without waiting

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        for storage_id in list(self._locks):
            self._release(storage_id)  # wake any waiter
        self._sessions.clear()
        self._by_subject.clear()
        self._by_idp_session.clear()
        self._logins.clear()
        self._once.clear()
        self._backoffs.clear()


def _discard(index: dict[str, set[str]], value: str, storage_id: str) -> None:
    members = index.get(value)
    if members is not None:
        members.discard(storage_id)
        if not members:
            del index[value]
