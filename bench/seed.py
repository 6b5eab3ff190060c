"""Sessions for the session targets, written into Redis with tokengate's own store.

tokengate's login makes a session by ``new_secret()`` (the cookie's 32 random bytes),
``derive_handle(secret)`` (storage id and AES key) and ``RedisSessionStore.create``; this
module does the same, so what tokengate reads is exactly what it would have written
itself, and the cookie value is ``encode_secret(secret)``. The store is built from the
same ``session:`` section tokengate runs with (``targets.session_settings``).

Also measures what one session costs Redis: ``MEMORY USAGE`` of its HASH and of its
subject index SET (the key layout ``sessions.redis_store`` documents), and the growth of
``used_memory`` per session while seeding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from issuer import SCOPE
from procs import BenchError

from gateway.metrics import Metrics
from gateway.sessions.cookie import encode_secret, new_secret
from gateway.sessions.crypto import derive_handle, digest, seal_session
from gateway.sessions.model import Session
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings

_CONCURRENCY = 32  # creates in flight while seeding


@dataclass(frozen=True, slots=True)
class Seeded:
    cookie: str  # the session cookie's value
    storage_id: str
    session: Session


@dataclass(frozen=True, slots=True)
class Footprint:
    """What the seeded sessions cost Redis (bench sessions: no ID token, one claim)."""

    sessions: int
    session_key: str  # one session's HASH, as ``redis_store`` lays it out
    session_bytes: int  # MEMORY USAGE of that HASH
    index_key: str  # its subject's index SET
    index_bytes: int  # MEMORY USAGE of that SET
    used_memory_per_session: float  # INFO used_memory growth / sessions seeded
    json_bytes: int  # the session's JSON
    sealed_bytes: int  # that JSON sealed (AES-GCM nonce + ciphertext + tag)
    access_token_bytes: int
    refresh_token_bytes: int
    seconds: float  # time to seed them all


def new_session(
    subject: str, access_token: str, access_expires_at: float, refresh_token: str
) -> Session:
    """A session as a login would leave it, minus the ID token."""
    return Session(
        subject=subject,
        access_token=access_token,
        access_expires_at=access_expires_at,
        refresh_token=refresh_token,
        scopes=tuple(sorted(SCOPE.split())),
        claims={"sub": subject},
        created_at=time.time(),
    )


def session_key(settings: SessionSettings, storage_id: str) -> str:
    return f"{settings.key_prefix}:{{{storage_id}}}:s"  # see gateway/sessions/redis_store.py


def subject_index_key(settings: SessionSettings, subject: str) -> str:
    return f"{settings.key_prefix}:sub:{digest(subject)}"


async def _create_all(settings: SessionSettings, sessions: Sequence[Session]) -> list[Seeded]:
    store = RedisSessionStore(settings, build_redis(settings), Metrics())
    try:
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def create(session: Session) -> Seeded:
            secret = new_secret()
            handle = derive_handle(secret)
            async with gate:
                stored = await store.create(handle, session)
            return Seeded(encode_secret(secret), handle.storage_id, stored)

        return await asyncio.gather(*(create(s) for s in sessions))
    finally:
        await store.aclose()


def seed(settings: SessionSettings, sessions: Sequence[Session]) -> list[Seeded]:
    """Create ``sessions`` in Redis; their cookie values, in order."""
    return asyncio.run(_create_all(settings, sessions))


async def _used_memory(settings: SessionSettings) -> int:
    client = build_redis(settings)
    try:
        info: dict[str, Any] = await client.info("memory")
        return int(info["used_memory"])
    finally:
        await client.aclose()


async def _memory_usage(settings: SessionSettings, keys: Sequence[str]) -> list[int]:
    client = build_redis(settings)
    try:
        sizes = []
        for key in keys:
            size = await client.memory_usage(key, samples=0)  # samples 0: every element
            if size is None:
                raise BenchError(f"no key {key} in Redis: has the store's key layout changed?")
            sizes.append(int(size))
        return sizes
    finally:
        await client.aclose()


def seed_and_measure(
    settings: SessionSettings, sessions: Sequence[Session]
) -> tuple[list[Seeded], Footprint]:
    """``seed``, plus what the sessions cost Redis."""
    before = asyncio.run(_used_memory(settings))
    started = time.monotonic()
    seeded = seed(settings, sessions)
    seconds = time.monotonic() - started
    after = asyncio.run(_used_memory(settings))
    first = seeded[0]
    keys = [
        session_key(settings, first.storage_id),
        subject_index_key(settings, first.session.subject),
    ]
    session_bytes, index_bytes = asyncio.run(_memory_usage(settings, keys))
    handle = derive_handle(new_secret())  # any key: the sealed size does not depend on it
    return seeded, Footprint(
        sessions=len(seeded),
        session_key=keys[0],
        session_bytes=session_bytes,
        index_key=keys[1],
        index_bytes=index_bytes,
        used_memory_per_session=(after - before) / len(seeded),
        json_bytes=len(first.session.to_json()),
        sealed_bytes=len(seal_session(handle, first.session)),
        access_token_bytes=len(first.session.access_token),
        refresh_token_bytes=len(first.session.refresh_token or ""),
        seconds=seconds,
    )
